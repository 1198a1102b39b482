"""The engine: take a delivery, decode it, ask the provider, publish the reply, then settle.

Delivery rules kept here (DESIGN.md, "Rules of delivery"):
- the input is acked only after the reply's publish was confirmed;
- a reply is remembered (idempotency store) before it is published, so a
  redelivered job gets the same reply again without a second LLM call;
- a transient failure (provider down, 5xx, 429, timeout, JOB_TIMEOUT) goes
  through a delay queue with exponential backoff and jitter, MAX_RETRIES times;
- after the last attempt, or at once for a permanent failure, the job is
  dead-lettered with its reason, and the chat gets an error reply whenever its
  conversation id can be read: no chat window waits forever;
- on shutdown, jobs not finished within the grace period go back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from chatprocessor.contracts.base import Codec, EventCodec
from chatprocessor.contracts.chat import body_digest, reply_message_id
from chatprocessor.core.errors import (
    BrokerUnavailable,
    BudgetExceeded,
    ChatProcessorError,
    CircuitOpen,
    Forbidden,
    InvalidModelOutput,
    MessageRejected,
    NotForUs,
    ProviderError,
    ProviderTimeout,
    PublishFailed,
    StoreUnavailable,
    TenantRateLimited,
    Unroutable,
)
from chatprocessor.core.job import ChatMessage, Job, Result
from chatprocessor.core.retry import MAX_WAIT, RetryPolicy
from chatprocessor.core.streaming import Generation, PieceSink, until_cancelled
from chatprocessor.ops import metrics
from chatprocessor.ops.logging import conversation_id_var
from chatprocessor.providers.base import ChatRequest, Provider, same_model
from chatprocessor.ratelimit import RateLimiter
from chatprocessor.sanitize import repair_prompt, sanitize
from chatprocessor.stores.replies import NoReplyStore, ReplyStore, StoredReply
from chatprocessor.tasks import run_task
from chatprocessor.transports.base import (
    FAILED,
    FORBIDDEN,
    INTERNAL_ERROR,
    OVER_BUDGET,
    REJECTED,
    REPLY_REFUSED,
    RETRIES_EXHAUSTED,
    Delivery,
    Outgoing,
    Transport,
)

if TYPE_CHECKING:
    from chatprocessor.core.priority import PriorityGate
    from chatprocessor.events.cancel import CancelRegistry, CancelScope, CancelSource
    from chatprocessor.events.sink import EventSink
    from chatprocessor.features.conversation import Conversations
    from chatprocessor.features.governance import Governance
    from chatprocessor.stores.job_metrics import JobMetrics, JobRecord

log = logging.getLogger(__name__)

REPLY_TYPE = "BotResponseCreated"
CHUNK_TYPE = "BotResponseChunk"


@dataclass(frozen=True, slots=True)
class Lane:
    """One input queue with its own prefetch, retry budget and deadline (seed 004's lanes)."""

    name: str
    queue: str
    prefetch: int
    retry: RetryPolicy
    #: Deadline of one attempt, seconds.
    job_timeout: float


@dataclass(slots=True)
class WorkerConfig:
    input_queue: str
    output_queue: str
    prefetch: int = 1
    graceful_timeout: float = 30.0
    system_prompt: str = ""
    #: Streamed tokens are batched for this long before a chunk message is published.
    stream_flush_interval: float = 0.05
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: Deadline of one attempt (JOB_TIMEOUT); shorter than the broker's consumer timeout.
    job_timeout: float = 600.0
    #: How long a job the broker refuses to park (delay or dead-letter queue) is held.
    refused_pause: float = 5.0
    #: PULL_MISSING_MODELS: pull the default model at start-up when the provider lacks it.
    pull_missing_models: bool = False
    #: Models pulled at start-up when the provider lacks them (SUPPORTED_MODELS on Ollama).
    models_to_pull: tuple[str, ...] = ()
    #: How long a job skipped by open circuit breakers may wait without using attempts,
    #: counted from its first failure (app: the retry budget, at least 2 breaker cool-downs).
    breaker_patience: float = 60.0
    #: Input queues besides (instead of) ``input_queue``: the pipeline's high, standard and
    #: batch lanes. Empty: one lane, ``input_queue`` with ``prefetch``, ``retry``, ``job_timeout``.
    lanes: tuple[Lane, ...] = ()

    def all_lanes(self) -> tuple[Lane, ...]:
        if self.lanes:
            return self.lanes
        return (Lane("default", self.input_queue, self.prefetch, self.retry, self.job_timeout),)


class Worker:
    """Consumes ``input_queue`` and answers every job; ``prefetch`` jobs run at once."""

    def __init__(
        self,
        transport: Transport,
        provider: Provider,
        codec: Codec,
        config: WorkerConfig,
        store: ReplyStore | None = None,
        *,
        limiter: RateLimiter | None = None,
        conversations: Conversations | None = None,
        events: EventSink | None = None,
        cancels: CancelRegistry | None = None,
        cancel_source: CancelSource | None = None,
        job_metrics: JobMetrics | None = None,
        governance: Governance | None = None,
        gate: PriorityGate | None = None,
    ) -> None:
        self.transport = transport
        self.governance = governance
        #: MODEL_CONCURRENCY slots, highest priority first (None: no limit but prefetch).
        self.gate = gate
        self.limiter = limiter
        self.conversations = conversations
        self.events = events
        self.cancels = cancels
        self.cancel_source = cancel_source
        self.job_metrics = job_metrics
        self.provider = provider
        self.codec = codec
        self.config = config
        self.store: ReplyStore = store or NoReplyStore()
        self._tasks: set[asyncio.Task[None]] = set()
        self._lanes = {lane.queue: lane for lane in config.all_lanes()}
        self._default_lane = config.all_lanes()[0]

    @property
    def sends_events(self) -> bool:
        """Answers leave as events through the event sink (the stream door)."""
        return self.codec.emits_events and self.events is not None

    # -- start-up ----------------------------------------------------------------------

    async def start(self) -> None:
        """Startup health checks: broker (retrying until it answers), queues, store, provider."""
        await self.transport.connect()
        for lane in self._lanes.values():
            await self.transport.declare_input(lane.queue)
        await self.transport.declare(self.config.output_queue)
        log.info(
            "broker ready; consuming %s, replying to %r",
            ", ".join(repr(queue) for queue in self._lanes),
            self.config.output_queue,
        )
        # Opens the store now, not under the first job.
        if not await self.store.ping():
            log.warning("idempotency store unavailable; jobs will be answered without it")
        if self.events is not None:
            await self.events.connect()
        if self.conversations is not None:
            await self.conversations.start()
        if self.job_metrics is not None:
            await self.job_metrics.start()
        if self.governance is not None:
            await self.governance.start()
        await self.check_provider()

    async def close_features(self) -> None:
        """Close what ``start`` opened besides the transport, provider and store."""
        if self.cancel_source is not None:
            await self.cancel_source.close()
        if self.events is not None:
            await self.events.close()
        if self.conversations is not None:
            await self.conversations.close()
        if self.job_metrics is not None:
            await self.job_metrics.close()  # writes what is still queued
        if self.governance is not None:
            await self.governance.close()

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
        pull = getattr(self.provider, "pull_model", None)
        for wanted in self.config.models_to_pull:
            if pull is not None and not any(same_model(wanted, m) for m in models):
                log.info("downloading missing supported model %r", wanted)
                try:
                    await pull(wanted)
                except ProviderError as exc:
                    log.error("could not pull model %r: %s", wanted, exc)
        model = self.provider.default_model
        if any(same_model(model, available) for available in models):
            log.info("provider %s ready with model %r", self.provider.name, model)
            return True
        if self.config.pull_missing_models and pull is not None:
            log.info("provider %s does not have model %r: pulling it", self.provider.name, model)
            try:
                await pull(model)
            except ProviderError as exc:
                log.error("could not pull model %r: %s", model, exc)
            else:
                log.info("model %r pulled", model)
                return True
        log.warning(
            "provider %s does not have model %r (it has: %s)%s",
            self.provider.name,
            model,
            ", ".join(models) or "none",
            "" if pull is None else "; PULL_MISSING_MODELS=true pulls it at start-up",
        )
        return True

    async def health_details(self) -> dict[str, Any]:
        """/health: the rate limits' usage (metrics updated too), when there are limits."""
        if self.limiter is None:
            return {}
        try:
            usage = await self.limiter.usage()
        except StoreUnavailable as exc:
            return {"rate_limits": {"error": str(exc)}}
        for period, numbers in usage.items():
            metrics.labelled(metrics.RATE_LIMIT, period).set(numbers["limit"])
            metrics.labelled(metrics.RATE_LIMIT_USED, period).set(numbers["used"])
        return {"rate_limits": usage}

    async def readiness(self) -> dict[str, bool]:
        """/ready: the broker answers, the provider answers and has the configured model."""
        model = self.provider.default_model
        try:
            models = await self.provider.list_models()
        except ProviderError:
            models = []
        return {
            "broker": await self.transport.ping(),
            "provider": await self.provider.ping(),
            "model": any(same_model(model, available) for available in models),
        }

    # -- the loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then drain within the grace period."""
        listener = None
        if self.cancel_source is not None and self.cancels is not None:
            listener = asyncio.create_task(self.cancel_source.run(self.cancels), name="cancels")
        try:
            await self._run(stop)
        finally:
            if listener is not None:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)

    async def _run(self, stop: asyncio.Event) -> None:
        consumer = asyncio.create_task(self._consume(), name="consumer")
        stopper = asyncio.create_task(stop.wait(), name="stop")
        done, _ = await asyncio.wait({consumer, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        consumer.cancel()
        # gather, not await: the consumer's own error must not skip the drain below.
        [ended] = await asyncio.gather(consumer, return_exceptions=True)
        failure = ended if consumer in done and isinstance(ended, Exception) else None
        await self.drain()  # jobs in flight finish even when consuming failed
        if failure is not None:
            raise failure

    async def _consume(self) -> None:
        lanes = list(self._lanes.values())
        if len(lanes) == 1:
            await self._consume_lane(lanes[0])
            return
        consumers = [
            asyncio.create_task(self._consume_lane(lane), name=f"consumer {lane.name}")
            for lane in lanes
        ]
        try:
            # A lane whose consumer ends stops the worker: its jobs would wait unseen.
            done, _ = await asyncio.wait(consumers, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in consumers:
                task.cancel()
            await asyncio.gather(*consumers, return_exceptions=True)

    async def _consume_lane(self, lane: Lane) -> None:
        async for delivery in self.transport.consume(lane.queue, lane.prefetch):
            task = asyncio.create_task(self.handle(delivery))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # Only the broker ends a consumer (queue deleted): stop loudly, not with exit 0.
        raise BrokerUnavailable(f"the broker stopped delivering from {lane.queue!r}")

    def _lane(self, delivery: Delivery) -> Lane:
        return self._lanes.get(delivery.queue, self._default_lane)

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
            await asyncio.shield(self._release(delivery))
            metrics.MESSAGES.labels("released").inc()
            raise
        except BrokerUnavailable as exc:
            # The connection failed under us: hand the job back so it is
            # redelivered (on a dead connection the broker does that by itself).
            log.error("broker failed while processing (%s); the message will be redelivered", exc)
            await self._release(delivery)
            outcome = "released"
        except PublishFailed as exc:
            # Even the dead-letter queue refused the job (full, or a policy): nothing
            # can take it now. Hold it for a pause before handing it back, so a broker
            # in that state sees a slow trickle, not a loop through the LLM.
            log.error(
                "the broker refused to park message %s (%s); returning it in %.0fs",
                delivery.message_id,
                exc,
                self.config.refused_pause,
            )
            await asyncio.sleep(self.config.refused_pause)
            await self._release(delivery)
            outcome = "released"
        except Exception as exc:
            # A bug or a surprise from a library must not wedge a prefetch slot:
            # settle the message like a permanent failure and keep going.
            log.exception("unexpected error while processing message %s", delivery.message_id)
            reason = f"internal error: {type(exc).__name__}: {exc}"
            try:
                outcome = await self._reject(delivery, reason, kind=INTERNAL_ERROR)
            except Exception:
                log.exception("could not dead-letter message %s", delivery.message_id)
                await self._release(delivery)
                outcome = "released"
        finally:
            metrics.IN_FLIGHT.dec()
            metrics.PROCESSING_SECONDS.observe(time.perf_counter() - started)
        metrics.labelled(metrics.MESSAGES, outcome).inc()

    @staticmethod
    async def _release(delivery: Delivery) -> None:
        with contextlib.suppress(BrokerUnavailable):
            await delivery.release()

    async def _process(self, delivery: Delivery) -> str:
        wait = delivery.retry_at - time.time()
        if wait > max(MAX_WAIT, self._lane(delivery).retry.cap):
            log.warning("ignoring a due time %.0fs away (clock skew?): processing now", wait)
        elif wait > 0:
            # Back from a delay queue shorter than its delay: one more hop, no attempt spent
            # (never early: a Retry-After is a floor).
            await delivery.retry(wait, "waiting for the retry time", count=False)
            return "delayed"
        decode = functools.partial(
            self.codec.decode,
            delivery.body,
            message_id=delivery.message_id,
            reply_to=delivery.reply_to,
            correlation_id=delivery.correlation_id,
        )
        try:
            job = await asyncio.to_thread(decode) if self.codec.decode_in_thread else decode()
        except NotForUs as exc:
            log.info("skipped message %s: %s", delivery.message_id, exc)
            await delivery.ack()
            return "skipped"
        except MessageRejected as exc:
            return await self._reject(delivery, str(exc))

        token = conversation_id_var.set(job.conversation_id)
        try:
            # The body's digest is part of the key: a message_id reused for another
            # request (another conversation) must never get that request's reply.
            key = f"{self.config.input_queue}:{job.id}:{body_digest(delivery.body)}"
            return await self._process_job(delivery, job, key)
        finally:
            conversation_id_var.reset(token)

    async def _process_job(self, delivery: Delivery, job: Job, key: str) -> str:
        stored = await self._recall(key)
        if stored is not None:
            log.info("already answered: sending the stored reply again (no LLM call)")
            metrics.DUPLICATES.inc()
            outcome = await self._deliver(delivery, job, _outgoing(stored))
            return "duplicate" if outcome == "replied" else outcome
        log.info(
            "Processing prompt (%d chars)%s%s",
            len(job.prompt),
            f" [attempt {delivery.attempt + 1}]" if delivery.attempt else "",
            " [redelivered]" if delivery.redelivered else "",
        )
        log.debug("prompt: %s", job.prompt)
        if self.job_metrics is not None:
            self.job_metrics.started(self._record(job, delivery, Result("", "", status="running")))
        lane = self._lane(delivery)
        job.meta["lane"] = lane.name
        if lane.job_timeout < self.config.job_timeout:
            job.meta["timeout"] = min(
                float(job.meta.get("timeout", lane.job_timeout)), lane.job_timeout
            )
        try:
            if self.governance is not None:
                result = await self.governance.run(
                    job, lane.name, _Calls(self, job, delivery.attempt)
                )
            else:
                result = await self._produce(job, delivery.attempt)
        except Forbidden as exc:
            return await self._give_up(delivery, job, str(exc), FORBIDDEN, status="forbidden")
        except TenantRateLimited as exc:
            # The seed delays a tenant over its rate: back through a delay queue, no attempt used.
            log.info("%s; waiting %.1fs", exc, exc.retry_after)
            return await self._retry(delivery, job, exc, exc.retry_after, count=False)
        except BudgetExceeded as exc:
            return await self._give_up(delivery, job, str(exc), OVER_BUDGET, status="over_budget")
        except ProviderError as exc:
            return await self._failed(delivery, job, exc)
        except PublishFailed as exc:  # a streamed chunk could not be published
            return await self._publish_failed(delivery, exc)
        message = await self._remember(key, self._reply(job, result))
        outcome = await self._deliver(delivery, job, message)
        if outcome == "replied":
            log.info("Response published (%s ms, model %s)", result.latency_ms, result.model_used)
            if self.conversations is not None:
                await self.conversations.remember(job, result)
            self._finished(job, delivery, result)
            if self.governance is not None:
                await self.governance.finished(job, lane.name, result)
        return outcome

    async def _produce(self, job: Job, attempt: int) -> Result:
        """The answer to a job: a task, or a conversation (history and passages fitted)."""
        if job.kind != "chat":
            result = await self._run_task(job)
        else:
            result = await self._converse(job, attempt)
        if job.format is not None:
            result = await self._as_json(job, result, attempt)
        return result

    async def _converse(self, job: Job, attempt: int) -> Result:
        """A chat job: its conversation (history, passages) fitted, then one LLM attempt."""
        if self.conversations is None:
            return await self._answer(job, attempt)
        prepared = await self.conversations.prepare(job)
        result = await self._answer(job, attempt, prepared.messages)
        result.sources = prepared.sources
        if result.prompt_tokens is None:
            result.prompt_tokens = prepared.prompt_tokens
        return result

    def _record(self, job: Job, delivery: Delivery, result: Result) -> JobRecord:
        from chatprocessor.stores.job_metrics import JobRecord

        return JobRecord(
            job_id=job.id,
            tenant_id=job.tenant,
            user_id="" if job.user_id is None else str(job.user_id),
            session_id=str(job.conversation_id),
            mode=job.mode,
            model=result.model_used or job.model or self.provider.default_model,
            provider=result.provider,
            status=result.status,
            error=result.error,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            latency_ms=result.latency_ms,
            time_to_first_token_ms=result.time_to_first_token_ms,
            attempts=delivery.attempt + 1,
        )

    def _finished(self, job: Job, delivery: Delivery, result: Result) -> None:
        """The job's final row and messages (queued: the database never delays a job)."""
        if self.job_metrics is None:
            return
        from chatprocessor.stores.job_metrics import MessageRecord

        messages = [MessageRecord("user", job.prompt)]
        if result.error is None:
            messages.append(MessageRecord("assistant", result.text, result.completion_tokens))
        self.job_metrics.finished(self._record(job, delivery, result), messages)

    async def _deliver(self, delivery: Delivery, job: Job, message: Outgoing) -> str:
        """Publish the reply (confirmed), then ack."""
        try:
            await self._publish_reply(job, message)
        except PublishFailed as exc:
            return await self._publish_failed(delivery, exc)
        await delivery.ack()
        return "replied"

    async def _publish_failed(self, delivery: Delivery, exc: PublishFailed) -> str:
        if isinstance(exc, Unroutable):
            # Only reply_to queues are unroutable here: the requester left.
            log.warning("requester is gone, reply dropped: %s", exc)
            await delivery.ack()
            return "requester_gone"
        # The broker refused the reply (nack): park the job, never requeue in a loop.
        reason = f"reply not accepted by the broker: {exc}"
        log.error("%s", reason)
        await self._dead_letter(delivery, reason, REPLY_REFUSED)
        return "reply_refused"

    async def _failed(self, delivery: Delivery, job: Job, exc: ProviderError) -> str:
        """A failed attempt: back through a delay queue, or dead-lettered with an error reply."""
        attempts = delivery.attempt + 1
        policy = self._lane(delivery).retry
        if isinstance(exc, CircuitOpen) and self._may_wait_for_breakers(delivery):
            # No provider was asked: wait for a breaker to let a call through again,
            # without spending an attempt (the trial call, not this job, tests the provider).
            delay = policy.delay(attempts, exc.retry_after)
            log.info("every provider is skipped (%s); waiting %.1fs", exc, delay)
            return await self._retry(delivery, job, exc, delay, count=False)
        if exc.transient and policy.should_retry(attempts):
            delay = policy.delay(attempts, exc.retry_after)
            log.warning(
                "attempt %d of %d failed (%s); retrying in %.1fs",
                attempts,
                policy.max_retries + 1,
                exc,
                delay,
            )
            return await self._retry(delivery, job, exc, delay)
        kind = RETRIES_EXHAUSTED if exc.transient else FAILED
        return await self._give_up(delivery, job, str(exc), kind)

    def _may_wait_for_breakers(self, delivery: Delivery) -> bool:
        first = delivery.first_failed_at
        return first is None or time.time() - first < self.config.breaker_patience

    async def _retry(
        self,
        delivery: Delivery,
        job: Job,
        exc: ChatProcessorError,
        delay: float,
        *,
        count: bool = True,
    ) -> str:
        try:
            await delivery.retry(delay, str(exc), count=count)
        except PublishFailed as refused:  # the delay queue is full: give up now
            log.error("the delay queue refused the retry: %s", refused)
            return await self._give_up(delivery, job, f"{exc} (retry refused: {refused})")
        metrics.RETRIES.labels(type(exc).__name__).inc()
        return "retried"

    async def _give_up(
        self,
        delivery: Delivery,
        job: Job,
        reason: str,
        kind: str = RETRIES_EXHAUSTED,
        *,
        status: str = "failed",
    ) -> str:
        """The last word: an error reply to the chat, then the dead-letter queue."""
        log.error("giving up after %d attempt(s): %s", delivery.attempt + 1, reason)
        model = job.model or self.provider.default_model
        error = Result(text="", model_used=model, error=reason, status=status)
        await self._send_error_reply(job, error)
        await self._dead_letter(delivery, reason, kind)
        self._finished(job, delivery, error)
        if self.governance is not None:
            await self.governance.failed(job, self._lane(delivery).name, error, kind)
        return "dead_lettered"

    async def _reject(self, delivery: Delivery, reason: str, *, kind: str = REJECTED) -> str:
        """Permanent failure: error reply if possible, then dead-letter with the reason."""
        job = self.codec.error_job(
            delivery.body,
            message_id=delivery.message_id,
            reply_to=delivery.reply_to,
            correlation_id=delivery.correlation_id,
        )
        token = conversation_id_var.set(job.conversation_id if job is not None else None)
        try:
            log.warning("rejected message %s: %s", delivery.message_id or "(no id)", reason)
            if job is not None:
                # A job's status says whose fault it was; an internal error is a failure.
                status = kind if kind in (REJECTED, FORBIDDEN) else "failed"
                error = Result(
                    text="", model_used=self.provider.default_model, error=reason, status=status
                )
                await self._send_error_reply(job, error)
            await self._dead_letter(delivery, reason, kind)
            if job is not None:
                self._finished(job, delivery, error)
        finally:
            conversation_id_var.reset(token)
        return "rejected"

    async def _send_error_reply(self, job: Job, error: Result) -> None:
        try:
            await self._publish_reply(job, self._reply(job, error))
        except (PublishFailed, BrokerUnavailable) as exc:
            log.warning("could not send the error reply: %s", exc)

    @staticmethod
    async def _dead_letter(delivery: Delivery, reason: str, kind: str) -> None:
        await delivery.dead_letter(reason, reason=kind)
        metrics.DEAD_LETTERS.labels(kind).inc()

    async def _recall(self, key: str) -> StoredReply | None:
        try:
            return await self.store.get(key)
        except StoreUnavailable as exc:
            metrics.IDEMPOTENCY_ERRORS.inc()
            log.warning("idempotency store unreadable (%s); answering without it", exc)
            return None

    async def _remember(self, key: str, message: Outgoing) -> Outgoing:
        """Store the reply; if a copy of this request stored one first, send that one."""
        stored = StoredReply(message.body, message.message_id, message.correlation_id, message.type)
        try:
            kept = await self.store.put(key, stored)
        except StoreUnavailable as exc:
            metrics.IDEMPOTENCY_ERRORS.inc()
            log.warning("idempotency store unwritable (%s); a redelivery would ask again", exc)
            return message
        if kept != stored:
            log.info("a copy of this request was answered first: sending its reply")
            metrics.DUPLICATES.inc()
            return _outgoing(kept)
        return message

    async def _run_task(self, job: Job) -> Result:
        """A task of the task API door (chatprocessor/tasks.py), within JOB_TIMEOUT."""
        if self.limiter is not None and not await self.limiter.try_acquire():
            metrics.RATE_LIMIT_WAITS.inc()
            await self.limiter.acquire()  # over a rate limit the task waits, it never fails
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.config.job_timeout):
                result = await run_task(self.provider, job)
        except TimeoutError as exc:
            raise ProviderTimeout(
                f"no result within JOB_TIMEOUT ({self.config.job_timeout:g}s)"
            ) from exc
        result.latency_ms = _ms_since(started)
        return result

    async def _as_json(self, job: Job, result: Result, attempt: int) -> Result:
        """The answer as compact JSON (sanitize.py), the model asked once more if it gave none."""
        schema = job.format if isinstance(job.format, dict) else None

        async def repair(bad: str, reason: str) -> str:
            log.warning("the answer is not the JSON asked for (%s); asking once more", reason)
            conversation = [
                *job.messages(self.config.system_prompt),
                ChatMessage("assistant", bad),
                ChatMessage("user", repair_prompt(bad, reason, schema)),
            ]
            return (await self._answer(job, attempt, conversation)).text

        value = await sanitize(result.text, schema=schema, repair=repair)
        try:
            text = orjson.dumps(value).decode()
        except (TypeError, orjson.JSONEncodeError) as exc:  # e.g. an integer over 64 bits
            raise InvalidModelOutput(f"the answer's JSON cannot be sent on: {exc}") from exc
        return dataclasses.replace(result, text=text)

    async def _answer(
        self, job: Job, attempt: int = 0, messages: list[ChatMessage] | None = None
    ) -> Result:
        """One attempt at the LLM, within JOB_TIMEOUT; raises ProviderError on failure.

        A door that streams events keeps what was generated when the job is cancelled
        or runs out of time, and reports it with status ``cancelled`` or ``timeout``.
        """
        request = ChatRequest(
            messages=messages or job.messages(self.config.system_prompt),
            model=job.model,
            temperature=job.temperature,
            max_tokens=job.max_tokens,
            format=job.format,
        )
        events = self.sends_events
        send = self._piece_sink(job, attempt, events)
        scope = self._cancel_scope(job) if events else None
        timeout = self.config.job_timeout
        if "timeout" in job.meta:
            timeout = min(timeout, float(job.meta["timeout"]))
        state = Generation(job.model or self.provider.default_model, self.provider.name)
        status = "completed"
        try:
            async with asyncio.timeout(timeout):
                work = self._generate(request, state, send)
                if self.gate is not None:
                    work = self._gated(work, job)
                if scope is None:
                    await work
                elif await until_cancelled(work, scope.event):
                    status = "cancelled"
        except TimeoutError as exc:
            if not events:
                raise ProviderTimeout(
                    f"no complete answer within JOB_TIMEOUT ({timeout:g}s)"
                ) from exc
            status = "timeout"
        finally:
            if scope is not None and self.cancels is not None:
                self.cancels.unregister(job.id)
            seconds = time.perf_counter() - state.started
            metrics.labelled(metrics.LLM_SECONDS, state.provider).observe(seconds)
        if status != "completed":
            log.warning("generation stopped (%s) after %d characters", status, len(state.text))
            metrics.labelled(metrics.STOPPED_EARLY, status).inc()
            if send is not None:
                await state.flush(send)
        if state.prompt_tokens:
            metrics.labelled(metrics.TOKENS, "prompt").inc(state.prompt_tokens)
        if state.completion_tokens:
            metrics.labelled(metrics.TOKENS, "completion").inc(state.completion_tokens)
        return Result(
            text=state.text.strip(),
            model_used=state.model,
            prompt_tokens=state.prompt_tokens,
            completion_tokens=state.completion_tokens,
            latency_ms=_ms_since(state.started),
            status=status,
            time_to_first_token_ms=state.ms_to_first_token(),
            provider=state.provider,
        )

    async def _gated(self, work: typing.Coroutine[Any, Any, None], job: Job) -> None:
        """``work`` once the gate gives this job a model slot (highest priority first)."""
        assert self.gate is not None
        waited = time.perf_counter()
        try:
            async with self.gate.slot(job.priority or 0):
                lane = str(job.meta.get("lane", "default"))
                metrics.labelled(metrics.AI_QUEUE_WAIT, lane).observe(time.perf_counter() - waited)
                await work
        finally:
            work.close()  # never started when cancelled while waiting: no "never awaited" warning

    async def send_whole(self, job: Job, attempt: int, text: str) -> None:
        """A streamed job answered without the model (a cache hit): its text as one piece."""
        send = self._piece_sink(job, attempt, self.sends_events)
        if send is not None and text:
            await send(0, text)

    async def _generate(
        self, request: ChatRequest, state: Generation, send: PieceSink | None
    ) -> None:
        """Read the provider's chunks into ``state``, sending text in batches by time."""
        interval = self.config.stream_flush_interval
        state.last_flush = state.started - interval  # the first piece goes at once
        async for chunk in self.provider.chat(request, stream=send is not None):
            if chunk.delta:
                state.parts.append(chunk.delta)
                if state.first_token_at is None:
                    state.first_token_at = time.perf_counter()
                    if send is not None:
                        metrics.TIME_TO_FIRST_TOKEN.observe(state.first_token_at - state.started)
                if send is not None:
                    state.pending.append(chunk.delta)
                    if time.perf_counter() - state.last_flush >= interval:
                        await state.flush(send)
            if chunk.model:
                state.model = chunk.model
            if chunk.provider:
                state.provider = chunk.provider
            if chunk.done:
                state.prompt_tokens = chunk.prompt_tokens
                state.completion_tokens = chunk.completion_tokens
        if send is not None:
            await state.flush(send)

    def _piece_sink(self, job: Job, attempt: int, events: bool) -> PieceSink | None:
        """Where streamed text goes: token events, chunks to the requester's queue, or nowhere."""
        if events:
            codec = typing.cast(EventCodec, self.codec)
            sink = self.events
            assert sink is not None

            async def send_event(index: int, delta: str) -> None:
                await sink.send((codec.token_event(job, attempt, index, delta),))

            return send_event
        if job.stream and job.reply_to is not None:
            return functools.partial(self._publish_chunk, job, attempt)
        return None

    def _cancel_scope(self, job: Job) -> CancelScope | None:
        if self.cancels is None or job.user_id is None:
            return None
        return self.cancels.register(job.id, str(job.user_id))

    async def _publish_chunk(self, job: Job, attempt: int, index: int, delta: str) -> None:
        assert job.reply_to is not None
        await self.transport.publish(
            job.reply_to,
            Outgoing(
                self.codec.encode_chunk(job.conversation_id, index, delta),
                # A retried attempt streams again from index 0, under new ids.
                message_id=f"{reply_message_id(job.id)}.{attempt}.{index}",
                correlation_id=job.correlation_id or job.id,
                type=CHUNK_TYPE,
            ),
        )

    def _reply(self, job: Job, result: Result) -> Outgoing:
        return Outgoing(
            self.codec.reply(job, result),
            message_id=reply_message_id(job.id, error=result.error is not None),
            correlation_id=job.correlation_id or job.id,
            type=REPLY_TYPE,
        )

    async def _publish_reply(self, job: Job, message: Outgoing) -> None:
        """Publish and wait for the confirm; the output queue is re-declared once if it vanished."""
        if self.codec.emits_events and self.events is not None:  # sends_events, narrowed
            await self.events.send(orjson.loads(message.body))
            return
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


@dataclass(slots=True)
class _Calls:
    """The model calls one job may make, for the governance step (features/governance.py)."""

    worker: Worker
    job: Job
    attempt: int

    @property
    def streaming(self) -> bool:
        return self.job.stream or self.worker.sends_events

    @property
    def remembers(self) -> bool:
        """The answer depends on stored history (which a cache key cannot see)."""
        conversations = self.worker.conversations
        return conversations is not None and conversations.history is not None

    async def answer(self, job: Job) -> Result:
        """``job``'s answer as the worker gives it without governance."""
        return await self.worker._produce(job, self.attempt)

    async def ask(self, job: Job, messages: list[ChatMessage]) -> Result:
        """One model call with exactly ``messages`` (and ``job``'s model settings and format)."""
        return await self.worker._answer(job, self.attempt, messages)

    async def send_whole(self, text: str) -> None:
        await self.worker.send_whole(self.job, self.attempt, text)


def _outgoing(stored: StoredReply) -> Outgoing:
    return Outgoing(
        stored.body,
        message_id=stored.message_id,
        correlation_id=stored.correlation_id,
        type=stored.type,
    )


def _ms_since(start: float) -> int:
    return round((time.perf_counter() - start) * 1000)
