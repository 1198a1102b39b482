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
            # The pipeline's lanes take priorities 1-10 (seed 004's AIJob.priority).
            priority_queues={queue: 10 for queue in settings.lanes.values()}
            if settings.uses_pipeline_contract
            else None,
        )
    if settings.transport == "tasks":
        from chatprocessor.oauth import client_credentials, token_url
        from chatprocessor.transports.task_api import TaskAPITransport

        auth = None
        if settings.oauth2_client_id:
            auth = client_credentials(
                token_url(
                    ory_project_slug=settings.ory_project_slug,
                    explicit_url=settings.oauth2_token_url,
                ),
                settings.oauth2_client_id,
                settings.oauth2_client_secret.get_secret_value(),
            )
        return TaskAPITransport(
            settings.api_base_url,
            auth,
            polling_interval=settings.polling_interval_seconds,
            request_timeout=settings.request_timeout,
        )
    if settings.transport == "kafka":
        from chatprocessor.transports.kafka import AIOKafkaClients, KafkaTransport

        return KafkaTransport(
            AIOKafkaClients(
                settings.bootstrap_server, max_poll_interval=settings.job_timeout + 300
            ),
            group_id=settings.consumer_group,
        )
    if settings.transport == "redis":
        from chatprocessor.transports.redis_streams import RedisStreamsTransport

        return RedisStreamsTransport(
            settings.redis_url or "redis://127.0.0.1:6379/0",
            group=settings.redis_stream_group,
            max_deliveries=settings.redis_max_deliveries,
            claim_idle=settings.redis_claim_idle,
            maxlen=settings.redis_stream_maxlen,
        )
    from chatprocessor.transports.local import LocalTransport

    return LocalTransport(
        settings.data_dir / "queue.sqlite3",
        visibility_timeout=settings.local_visibility_timeout,
    )
