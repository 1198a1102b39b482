"""Doors jobs come in by and replies go out through; one module per broker, same API in each."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatprocessor.settings import Settings
    from chatprocessor.transports.base import Transport


def build_transport(settings: Settings) -> Transport:
    """The transport TRANSPORT names, configured from settings."""
    if settings.transport == "rabbitmq":
        from chatprocessor.core.retry import RetryPolicy
        from chatprocessor.transports.rabbitmq import RabbitMQTransport

        return RabbitMQTransport(
            settings.rabbitmq_url,
            safe_url=settings.rabbitmq_safe_url,
            retry_tiers=RetryPolicy.from_settings(settings).tiers(),
        )
    if settings.transport == "kafka":
        from chatprocessor.transports.kafka import AIOKafkaClients, KafkaTransport

        return KafkaTransport(
            AIOKafkaClients(
                settings.bootstrap_server, max_poll_interval=settings.job_timeout + 300
            ),
            group_id=settings.consumer_group,
        )
    from chatprocessor.transports.local import LocalTransport

    return LocalTransport(
        settings.data_dir / "queue.sqlite3",
        visibility_timeout=settings.local_visibility_timeout,
    )
