"""The engine: take a delivery, decode it, ask the provider, publish the reply, then settle.

Delivery rules kept here (DESIGN.md, "Rules of delivery"):
- the input is acked only after the reply's publish was confirmed;
- a message that can never be processed is dead-lettered at once, with its reason,
  and the chat still gets an error reply when its conversation id can be read;
- a provider failure produces an error reply (no chat window waits forever) and
  the message is dead-lettered with the reason;
- on shutdown, jobs not finished within the grace period go back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from chatprocessor.contracts.chat import ChatCodec, reply_message_id, request_id
from chatprocessor.core.errors import (
    BrokerUnavailable,
    MessageRejected,
    ProviderError,
    PublishFailed,
    Unroutable,
)
from chatprocessor.core.job import Job, Result
from chatprocessor.ops import metrics
from chatprocessor.ops.logging import conversation_id_var
from chatprocessor.providers.base import ChatRequest, Provider, same_model
from chatprocessor.transports.base import Delivery, Outgoing, Transport

log = logging.getLogger(__name__)

REPLY_TYPE = "BotResponseCreated"
CHUNK_TYPE = "BotResponseChunk"


@dataclass(slots=True)
class WorkerConfig:
    input_queue: str
    output_queue: str
    prefetch: int = 1
    graceful_timeout: float = 30.0
    system_prompt: str = ""
    #: Streamed tokens are batched for this long before a chunk message is published.
    stream_flush_interval: float = 0.05


class Worker:
    """Consumes ``input_queue`` and answers every job; ``prefetch`` jobs run at once."""

    def __init__(
        self, transport: Transport, provider: Provider, codec: ChatCodec, config: WorkerConfig
    ) -> None:
        self.transport = transport
        self.provider = provider
        self.codec = codec
        self.config = config
        self._tasks: set[asyncio.Task[None]] = set()

    # -- start-up ----------------------------------------------------------------------

    async def start(self) -> None:
        """Startup health checks: broker (retrying until it answers), queues, provider."""
        await self.transport.connect()
        await self.transport.declare(self.config.input_queue)
        await self.transport.declare(self.config.output_queue)
        log.info(
            "broker ready; consuming %r, replying to %r",
            self.config.input_queue,
            self.config.output_queue,
        )
        await self.check_provider()

    async def check_provider(self) -> bool:
        """Log whether the provider answers and has its default model."""
        if not await self.provider.ping():
            log.error(
                "provider %s is not reachable; jobs will get error replies until it is",
                self.provider.name,
            )
            return False
        try:
            models = await self.provider.list_models()
        except ProviderError as exc:
            log.warning("provider %s: cannot list models (%s)", self.provider.name, exc)
            return True
        model = self.provider.default_model
        if not any(same_model(model, available) for available in models):
            log.warning(
                "provider %s does not have model %r (it has: %s)",
                self.provider.name,
                model,
                ", ".join(models) or "none",
            )
        else:
            log.info("provider %s ready with model %r", self.provider.name, model)
        return True

    async def readiness(self) -> dict[str, bool]:
        return {"broker": await self.transport.ping(), "provider": await self.provider.ping()}

    # -- the loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then drain within the grace period."""
        consumer = asyncio.create_task(self._consume(), name="consumer")
        stopper = asyncio.create_task(stop.wait(), name="stop")
        done, _ = await asyncio.wait({consumer, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        failure = consumer.exception() if consumer in done else None
        await self.drain()  # jobs in flight finish even when consuming failed
        if failure is not None:
            raise failure

    async def _consume(self) -> None:
        async for delivery in self.transport.consume(self.config.input_queue, self.config.prefetch):
            task = asyncio.create_task(self.handle(delivery))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # Only the broker ends a consumer (queue deleted): stop loudly, not with exit 0.
        raise BrokerUnavailable(f"the broker stopped delivering from {self.config.input_queue!r}")

    async def drain(self) -> None:
        """Let in-flight jobs finish for GRACEFUL_TIMEOUT; the rest go back to the queue."""
        if not self._tasks:
            return
        log.info(
            "stopping: waiting up to %.0fs for %d job(s) in flight",
            self.config.graceful_timeout,
            len(self._tasks),
        )
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.config.graceful_timeout)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("returning %d unfinished job(s) to the queue", len(pending))
            await asyncio.wait(pending)

    # -- one job -------------------------------------------------------------------------------

    async def handle(self, delivery: Delivery) -> None:
        """Process one delivery and settle it exactly once."""
        started = time.perf_counter()
        metrics.IN_FLIGHT.inc()
        try:
            outcome = await self._process(delivery)
        except asyncio.CancelledError:
            await asyncio.shield(delivery.release())
            metrics.MESSAGES.labels("released").inc()
            raise
        except BrokerUnavailable as exc:
            # The connection failed under us: hand the job back (on a dead
            # connection the broker does that by itself) so it is redelivered.
            log.error("broker failed while processing (%s); the message will be redelivered", exc)
            with contextlib.suppress(BrokerUnavailable):
                await delivery.release()
            outcome = "released"
        except Exception as exc:
            # A bug or a surprise from a library must not wedge a prefetch slot:
            # settle the message like a permanent failure and keep going.
            log.exception("unexpected error while processing message %s", delivery.message_id)
            outcome = await self._reject(delivery, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            metrics.IN_FLIGHT.dec()
            metrics.PROCESSING_SECONDS.observe(time.perf_counter() - started)
        metrics.MESSAGES.labels(outcome).inc()

    async def _process(self, delivery: Delivery) -> str:
        try:
            job = self.codec.decode(
                delivery.body,
                message_id=delivery.message_id,
                reply_to=delivery.reply_to,
                correlation_id=delivery.correlation_id,
            )
        except MessageRejected as exc:
            return await self._reject(delivery, str(exc))

        token = conversation_id_var.set(job.conversation_id)
        try:
            log.info(
                "Processing prompt (%d chars)%s",
                len(job.prompt),
                " [redelivered]" if delivery.redelivered else "",
            )
            log.debug("prompt: %s", job.prompt)
            try:
                result = await self._answer(job)
                await self._publish_reply(job, result)
            except Unroutable as exc:
                # Only reply_to queues are unroutable here: the requester left.
                log.warning("requester is gone, reply dropped: %s", exc)
                await delivery.ack()
                return "requester_gone"
            except PublishFailed as exc:
                # The broker refused the reply (nack): park the job, never requeue in a loop.
                reason = f"reply not accepted by the broker: {exc}"
                log.error("%s", reason)
                await delivery.dead_letter(reason)
                return "reply_refused"
            if result.error is None:
                await delivery.ack()
                log.info(
                    "Response published (%s ms, model %s)", result.latency_ms, result.model_used
                )
                return "replied"
            await delivery.dead_letter(result.error)
            return "error_reply"
        finally:
            conversation_id_var.reset(token)

    async def _reject(self, delivery: Delivery, reason: str) -> str:
        """Permanent failure: error reply if possible, then dead-letter with the reason."""
        conversation_id = self.codec.peek_conversation_id(delivery.body)
        token = conversation_id_var.set(conversation_id)
        try:
            log.warning("rejected message %s: %s", delivery.message_id or "(no id)", reason)
            if conversation_id is not None:
                job = Job(
                    id=request_id(delivery.body, delivery.message_id),
                    conversation_id=conversation_id,
                    prompt="",
                    reply_to=delivery.reply_to,
                    correlation_id=delivery.correlation_id,
                )
                error = Result(text="", model_used=self.provider.default_model, error=reason)
                try:
                    await self._publish_reply(job, error)
                except (PublishFailed, BrokerUnavailable) as exc:
                    log.warning("could not send the error reply: %s", exc)
            await delivery.dead_letter(reason)
        finally:
            conversation_id_var.reset(token)
        return "rejected"

    async def _answer(self, job: Job) -> Result:
        request = ChatRequest(
            messages=job.messages(self.config.system_prompt),
            model=job.model,
            temperature=job.temperature,
            max_tokens=job.max_tokens,
        )
        streaming = job.stream and job.reply_to is not None
        started = time.perf_counter()
        parts: list[str] = []
        pending: list[str] = []
        index = 0
        last_flush = started
        model = job.model or self.provider.default_model
        prompt_tokens = completion_tokens = None
        provider = self.provider.name
        try:
            async for chunk in self.provider.chat(request, stream=streaming):
                parts.append(chunk.delta)
                if chunk.model:
                    model = chunk.model
                if chunk.provider:
                    provider = chunk.provider
                if chunk.done:
                    prompt_tokens, completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
                if streaming and chunk.delta:
                    pending.append(chunk.delta)
                    now = time.perf_counter()
                    if now - last_flush >= self.config.stream_flush_interval:
                        await self._publish_chunk(job, index, "".join(pending))
                        index, pending, last_flush = index + 1, [], now
            if pending:
                await self._publish_chunk(job, index, "".join(pending))
        except ProviderError as exc:
            log.error("provider %s failed: %s", self.provider.name, exc)
            return Result(text="", model_used=model, error=str(exc), latency_ms=_ms_since(started))
        finally:
            metrics.LLM_SECONDS.labels(provider).observe(time.perf_counter() - started)
        if prompt_tokens:
            metrics.TOKENS.labels("prompt").inc(prompt_tokens)
        if completion_tokens:
            metrics.TOKENS.labels("completion").inc(completion_tokens)
        return Result(
            text="".join(parts).strip(),
            model_used=model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_ms=_ms_since(started),
        )

    async def _publish_chunk(self, job: Job, index: int, delta: str) -> None:
        assert job.reply_to is not None
        await self.transport.publish(
            job.reply_to,
            Outgoing(
                self.codec.encode_chunk(job.conversation_id, index, delta),
                message_id=f"{reply_message_id(job.id)}.{index}",
                correlation_id=job.correlation_id or job.id,
                type=CHUNK_TYPE,
            ),
        )

    async def _publish_reply(self, job: Job, result: Result) -> None:
        """Publish and wait for the confirm; the output queue is re-declared once if it vanished."""
        message = Outgoing(
            self.codec.encode(job.conversation_id, result),
            message_id=reply_message_id(job.id),
            correlation_id=job.correlation_id or job.id,
            type=REPLY_TYPE,
        )
        if job.reply_to:
            await self.transport.publish(job.reply_to, message)
            return
        try:
            await self.transport.publish(self.config.output_queue, message)
        except Unroutable:
            log.warning("output queue %r was missing; declaring it again", self.config.output_queue)
            await self.transport.declare(self.config.output_queue)
            try:
                await self.transport.publish(self.config.output_queue, message)
            except Unroutable as exc:  # not "requester gone": the shared queue is missing
                raise PublishFailed(str(exc)) from exc


def _ms_since(start: float) -> int:
    return round((time.perf_counter() - start) * 1000)
