"""Request/reply over the worker's own queue: what ``chatprocessor send`` does.

The request carries ``reply_to`` = a private queue, so replies meant for the
chat service on the output queue are never taken by this client.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from chatprocessor.contracts.chat import format_timestamp
from chatprocessor.core.worker import CHUNK_TYPE
from chatprocessor.transports.base import Outgoing, Transport


async def send_prompt(
    transport: Transport,
    queue: str,
    text: str,
    *,
    conversation_id: int | str,
    user_id: int | str = 0,
    stream: bool = False,
    timeout: float = 120.0,
    on_delta: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Publish one UserPromptReceived and return the BotResponseCreated answer as a dict.

    Raises TimeoutError when no answer arrives within ``timeout`` seconds.
    """
    reply_queue = await transport.open_reply_queue()
    correlation_id = uuid.uuid4().hex
    body = orjson.dumps(
        {
            "conversation_id": conversation_id,
            "message": text,
            "user_id": user_id,
            "timestamp": format_timestamp(datetime.now(UTC)),
            "stream": stream,
        }
    )
    try:
        await transport.publish(
            queue,
            Outgoing(
                body,
                message_id=correlation_id,
                correlation_id=correlation_id,
                reply_to=reply_queue.name,
                type="UserPromptReceived",
            ),
        )

        async def wait_for_answer() -> dict[str, Any]:
            async for message in reply_queue.messages():
                if message.correlation_id != correlation_id:
                    continue
                data: dict[str, Any] = orjson.loads(message.body)
                if message.type == CHUNK_TYPE:
                    if on_delta is not None:
                        on_delta(str(data.get("delta", data.get("Delta", ""))))
                    continue
                return data
            raise ConnectionError("reply queue closed before the answer arrived")

        return await asyncio.wait_for(wait_for_answer(), timeout)
    finally:
        await reply_queue.close()
