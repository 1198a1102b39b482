"""Scenario 3, embedded: the bundled Gemma 3 270M through chatprocessor and called directly.

Three contestants answer the same short factual prompts, streamed, at temperature 0 with the
same ``max_tokens``, so every one generates the same tokens:

- ``direct``: llama-cpp-python as a user would call it: a ``Llama`` with EmbeddedProvider's
  settings, the provider's ``transcript()`` and ``STOP``, generation streamed on one private
  thread, each piece handed to the event loop; in a process of its own, like each worker, and
  timed there, from the call to the first piece of text reaching its event loop;
- ``chatprocessor local`` and ``chatprocessor rabbitmq``: a ``python -m chatprocessor run``
  worker (PROVIDERS=embedded, prefetch 1) per transport, asked through the package's own
  transport client with ``stream: true`` and a private reply queue opened once per run, the
  way ``chatprocessor send --stream`` asks.

Each contestant loads its model once and answers warm-up prompts before any timing. Time to
first token runs from just before the request leaves (the publish, or the call) to the first
non-empty piece of text reaching the asker (this process, for the workers); the answer time
runs to the final reply (for chatprocessor: the BotResponseCreated, sent after the reply
store and the confirmed publish).
Tokens per second is completion tokens over answer time, summed over all answers.

Noise: requests go one at a time and the contestants take turns prompt by prompt, the order
rotated every prompt (and every round), so drift on the machine hits all three alike; each
has its own model, so each sees the same sequence of prompts and the same prompt cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from bench.common import (
    RABBITMQ_URL,
    ROOT,
    BenchProcess,
    Broker,
    Options,
    Outcome,
    QueueSet,
    Table,
    Target,
    chatprocessor_process,
    child_env,
    percentile,
    pyplot,
    run_loop,
    save_chart,
    scratch_dir,
    worker_env,
)

#: Short factual questions; the base model answers each in one line (STOP ends it there).
PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Who wrote Hamlet?",
    "What is the boiling point of water?",
    "How many legs does a spider have?",
    "What planet is closest to the sun?",
    "What is the largest ocean on Earth?",
    "Who painted the Mona Lisa?",
    "What is the chemical symbol for gold?",
    "How many days are in a leap year?",
    "What is the capital of Italy?",
    "What gas do plants absorb from the air?",
    "Who was the first person to walk on the moon?",
    "What is the tallest mountain in the world?",
    "What is the capital of Germany?",
    "How many continents are there?",
    "What is the freezing point of water?",
    "What language is spoken in Brazil?",
    "What is the largest planet in the solar system?",
    "Who discovered penicillin?",
    "What is the capital of Spain?",
    "How many hours are in a day?",
    "What is the longest river in the world?",
    "What is the hardest natural substance?",
    "Who invented the telephone?",
    "What is the capital of Canada?",
    "How many sides does a hexagon have?",
    "What is the main ingredient of guacamole?",
    "What is the smallest prime number?",
    "What is the capital of Australia?",
    "Which animal is known as the king of the jungle?",
    "What is the currency of Japan?",
    "How many minutes are in an hour?",
    "What is the capital of Egypt?",
    "Who developed the theory of relativity?",
    "What color is the sky on a clear day?",
    "What is the largest desert in the world?",
    "What is the capital of Russia?",
    "How many strings does a violin have?",
    "What is the square root of 81?",
    "Which planet is known as the Red Planet?",
    "What is the capital of China?",
    "Who wrote Pride and Prejudice?",
    "What is the largest mammal?",
    "How many players are on a soccer team?",
    "What is the capital of Greece?",
    "What is H2O commonly called?",
    "What is the capital of Portugal?",
    "How many weeks are in a year?",
    "Which metal is liquid at room temperature?",
    "What is the capital of Kenya?",
)
MAX_TOKENS = 32
TEMPERATURE = 0.0
#: TTFT may exceed direct's by this much (the issue's target).
TTFT_SLACK_MS = 10.0
TPS_RATIO = 0.95
CHUNK_TYPE = "BotResponseChunk"  # chatprocessor.core.worker.CHUNK_TYPE, kept import-light


@dataclass(slots=True)
class Sample:
    """One answer: seconds to the first piece of text and to the end, tokens, the text."""

    ttft: float
    total: float
    tokens: int
    text: str
    #: Seconds the worker says it spent in the LLM call (the reply's ``latency_ms``); NaN
    #: for direct. ``total - llm`` is what the answer spent outside the model, measured
    #: within the answer itself, so load elsewhere on the machine skews it far less.
    llm: float = math.nan


@dataclass(slots=True)
class Sizes:
    prompts: Sequence[str]
    #: Rounds through the prompts; the first always runs whole, later ones only while the
    #: timed part has not used ``budget`` seconds (a loaded machine gets fewer answers).
    rounds: int
    warmup: int
    timeout: float
    budget: float


FULL = Sizes(PROMPTS, rounds=2, warmup=3, timeout=120.0, budget=130.0)
SMOKE = Sizes(PROMPTS[:2], rounds=1, warmup=1, timeout=120.0, budget=30.0)


class Contestant(Protocol):
    name: str

    async def ask(self, prompt: str) -> Sample: ...


# -- direct ----------------------------------------------------------------------------------

_DONE = object()


class Direct:
    """llama-cpp-python called directly: EmbeddedProvider's Llama settings, transcript, STOP."""

    name = "direct"

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="direct-llm")
        self._llama: Any = None

    async def load(self) -> None:
        from chatprocessor.providers.embedded import bundled_model_path
        from chatprocessor.settings import Settings

        fields = Settings.model_fields  # the workers run on these defaults too

        def load() -> Any:
            from llama_cpp import Llama

            # The very arguments of EmbeddedProvider._load_sync, with the settings' defaults.
            return Llama(
                model_path=str(bundled_model_path()),
                n_ctx=fields["embedded_context"].default,
                n_threads=fields["embedded_threads"].default or None,
                verbose=False,
            )

        self._llama = await asyncio.get_running_loop().run_in_executor(self._executor, load)

    async def ask(self, prompt: str) -> Sample:
        from chatprocessor.core.job import ChatMessage
        from chatprocessor.providers.embedded import STOP, transcript

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        llama = self._llama
        text = transcript([ChatMessage("user", prompt)])

        def generate() -> None:
            try:
                for piece in llama.create_completion(
                    text, max_tokens=MAX_TOKENS, temperature=TEMPERATURE, stop=STOP, stream=True
                ):
                    loop.call_soon_threadsafe(queue.put_nowait, piece["choices"][0]["text"])
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        started = time.perf_counter()
        future = loop.run_in_executor(self._executor, generate)
        first = math.nan
        pieces: list[str] = []
        while (item := await queue.get()) is not _DONE:
            if item and math.isnan(first):
                first = time.perf_counter()
            pieces.append(item)
        ended = time.perf_counter()
        await future
        return Sample(first - started, ended - started, len(pieces), "".join(pieces).strip())

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._llama = None


class DirectProcess:
    """``Direct`` in a child process of its own (``python -m bench.embedded direct``), as each
    worker is: the benchmark's client loops never share its GIL or its share of the CPU.
    The child times each answer on its own clock and reports the ``Sample``."""

    name = "direct"

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / "direct.out").open("ab") as sink:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.embedded",
                "direct",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=sink,
                env=child_env(),
                cwd=ROOT,
            )

    async def _call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.process is not None
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(orjson.dumps(request) + b"\n")
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            log = (self.log_dir / "direct.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the direct llama-cpp-python process exited:\n{log}")
        answer: dict[str, Any] = orjson.loads(line)
        return answer

    async def ask(self, prompt: str, timeout: float = 120.0) -> Sample:
        answer = await self._call({"prompt": prompt}, timeout)
        answer.pop("llm", None)  # NaN, which JSON carries as null
        return Sample(**answer)

    async def stop(self) -> None:
        if self.process is None:
            return
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 15)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


async def _serve_direct() -> None:
    """The child of ``DirectProcess``: one JSON prompt per line in, one Sample per line out."""
    direct = Direct()
    await direct.load()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            sample = await direct.ask(orjson.loads(line)["prompt"])
            sys.stdout.buffer.write(orjson.dumps(dataclasses.asdict(sample)) + b"\n")
            sys.stdout.buffer.flush()
    finally:
        direct.close()


# -- through chatprocessor -------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    started: float
    first: float = math.nan
    ended: float = math.nan
    reply: dict[str, Any] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ThroughWorker:
    """A chatprocessor worker process, asked through the package's transport client."""

    def __init__(self, name: str, transport: Any, input_queue: str, process: BenchProcess) -> None:
        self.name = name
        self.transport = transport
        self.input_queue = input_queue
        self.process = process
        self._pending: dict[str, _Pending] = {}
        self._reply_queue: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self._reply_queue = await self.transport.open_reply_queue()
        self._reader = asyncio.create_task(self._read(), name=f"{self.name} replies")

    async def _read(self) -> None:
        async for message in self._reply_queue.messages():
            now = time.perf_counter()
            pending = self._pending.get(message.correlation_id or "")
            if pending is None:
                continue
            data: dict[str, Any] = orjson.loads(message.body)
            if message.type == CHUNK_TYPE:
                if data.get("delta") and math.isnan(pending.first):
                    pending.first = now
                continue
            pending.ended = now
            pending.reply = data
            pending.done.set()

    async def ask(self, prompt: str, timeout: float = 120.0) -> Sample:
        from chatprocessor.transports.base import Outgoing

        key = uuid.uuid4().hex
        body = orjson.dumps(
            {
                "conversation_id": key,
                "message": prompt,
                "user_id": 1,
                "stream": True,
                "options": {"temperature": TEMPERATURE, "max_tokens": MAX_TOKENS},
            }
        )
        message = Outgoing(
            body,
            message_id=key,
            correlation_id=key,
            reply_to=self._reply_queue.name,
            type="UserPromptReceived",
        )
        pending = self._pending[key] = _Pending(time.perf_counter())
        try:
            await self.transport.publish(self.input_queue, message)
            await self._wait(pending, timeout)
        finally:
            del self._pending[key]
        reply = pending.reply
        if reply.get("error"):
            raise RuntimeError(f"{self.name} answered with an error: {reply['error']}")
        return Sample(
            pending.first - pending.started,
            pending.ended - pending.started,
            int(reply.get("completion_tokens") or 0),
            str(reply.get("message", "")),
            float(reply.get("latency_ms", math.nan)) / 1000,
        )

    async def _wait(self, pending: _Pending, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not pending.done.is_set():
            if not self.process.running:
                raise RuntimeError(f"{self.name} worker exited:\n{self.process.console()}")
            if self._reader is not None and self._reader.done():
                self._reader.result()
                raise RuntimeError(f"{self.name}: the reply queue closed")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no answer in {timeout:g}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pending.done.wait(), 1.0)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._reply_queue is not None:
            with contextlib.suppress(Exception):
                await self._reply_queue.close()
        with contextlib.suppress(Exception):
            await self.transport.close()


@contextlib.asynccontextmanager
async def local_worker(data_dir: Path) -> AsyncIterator[ThroughWorker]:
    from chatprocessor.transports.local import LocalTransport

    queues = QueueSet.new("embedded-local")
    env = worker_env(queues, data_dir, TRANSPORT="local", PROVIDERS="embedded")
    process = await chatprocessor_process(env, "embedded-local", data_dir).start()
    transport = LocalTransport(data_dir / "queue.sqlite3")
    contestant = ThroughWorker("chatprocessor local", transport, queues.input, process)
    try:
        await transport.connect()
        await contestant.open()
        yield contestant
    finally:
        await contestant.close()
        await process.stop()


@contextlib.asynccontextmanager
async def rabbitmq_worker(data_dir: Path) -> AsyncIterator[ThroughWorker]:
    from chatprocessor.transports.rabbitmq import RabbitMQTransport

    queues = QueueSet.new("embedded-rabbitmq")
    env = worker_env(queues, data_dir, TRANSPORT="rabbitmq", PROVIDERS="embedded")
    async with Broker() as broker:
        await broker.declare(queues)
        process = await chatprocessor_process(env, "embedded-rabbitmq", data_dir).start()
        transport = RabbitMQTransport(RABBITMQ_URL)
        contestant = ThroughWorker("chatprocessor rabbitmq", transport, queues.input, process)
        try:
            await transport.connect(attempts=3)
            await contestant.open()
            yield contestant
        finally:
            await contestant.close()
            await process.stop()
            await broker.delete(queues)


# -- the run ---------------------------------------------------------------------------------


async def run(options: Options) -> Outcome:
    sizes = SMOKE if options.smoke else FULL
    with scratch_dir("embedded") as scratch:
        direct = DirectProcess(scratch)
        try:
            await direct.start()  # loads its model while the workers load theirs
            async with (
                local_worker(scratch / "local") as local,
                rabbitmq_worker(scratch / "rabbitmq") as rabbit,
            ):
                contestants: list[Contestant] = [direct, local, rabbit]
                started = time.perf_counter()
                for contestant in contestants:  # load (workers) and warm up, untimed
                    for prompt in PROMPTS[-sizes.warmup :]:
                        await _ask(contestant, prompt, timeout=sizes.timeout)
                warm = time.perf_counter() - started
                load_before = os.getloadavg()[0]
                samples = await _interleaved(contestants, sizes)
                load = (load_before, os.getloadavg()[0])
        finally:
            await direct.stop()
    outcome = _outcome(options, sizes, [c.name for c in contestants], samples, warm)
    outcome.notes.append(
        f"machine load average (1 min) {load[0]:.2f} before the timed answers, "
        f"{load[1]:.2f} after (this benchmark alone keeps about 1 core busy)"
    )
    return outcome


async def _ask(contestant: Contestant, prompt: str, *, timeout: float) -> Sample:
    return await asyncio.wait_for(contestant.ask(prompt), timeout)


async def _interleaved(contestants: Sequence[Contestant], sizes: Sizes) -> dict[str, list[Sample]]:
    """Every prompt by every contestant in turn, the order rotated each prompt and round."""
    samples: dict[str, list[Sample]] = {c.name: [] for c in contestants}
    deadline = time.monotonic() + sizes.budget
    turn = 0
    for round_ in range(sizes.rounds):
        for prompt in sizes.prompts:
            if round_ and time.monotonic() > deadline:
                return samples
            shift = turn % len(contestants)
            for contestant in [*contestants[shift:], *contestants[:shift]]:
                sample = await _ask(contestant, prompt, timeout=sizes.timeout)
                samples[contestant.name].append(sample)
            turn += 1
    return samples


def _ms(seconds: float) -> float:
    return seconds * 1000


def _tps(samples: Sequence[Sample]) -> float:
    seconds = sum(s.total for s in samples)
    return sum(s.tokens for s in samples) / seconds if seconds > 0 else math.nan


def _paired_ratio(mine: Sequence[Sample], base: Sequence[Sample]) -> float:
    """Median over answers of (my tokens/s) / (direct's tokens/s) for the same prompt and
    round: the two ran back to back, so a burst of load elsewhere on the machine skews one
    pair, not the estimate (the aggregate ratio beside it takes every burst in full)."""
    ratios = [
        (a.tokens / a.total) / (b.tokens / b.total)
        for a, b in zip(mine, base, strict=True)
        if a.total > 0 and b.total > 0 and b.tokens > 0
    ]
    return statistics.median(ratios) if ratios else math.nan


def _outcome(
    options: Options,
    sizes: Sizes,
    names: Sequence[str],
    samples: dict[str, list[Sample]],
    warm: float,
) -> Outcome:
    base = samples["direct"]
    base_tps = _tps(base)
    base_mean = _ms(statistics.fmean(s.ttft for s in base))
    base_p50 = _ms(percentile([s.ttft for s in base], 50))
    answers = len(base)
    table = Table(
        f"embedded: Gemma 3 270M, {answers} streamed answers each "
        f"({len(sizes.prompts)} prompts, {answers / len(sizes.prompts):g} rounds, temperature "
        f"{TEMPERATURE:g}, max_tokens {MAX_TOKENS}, interleaved)",
        [
            "contestant",
            "tokens",
            "same text",
            "tokens/s",
            "x direct",
            "x direct paired",
            "TTFT mean ms",
            "TTFT p50 ms",
            "TTFT p95 ms",
            "mean - direct",
            "p50 - direct",
            "answer mean ms",
            "outside LLM p50 ms",
        ],
    )
    outcome = Outcome("embedded", tables=[table])
    stats: dict[str, tuple[float, float, float]] = {}
    for name in names:
        mine = samples[name]
        ttfts = [_ms(s.ttft) for s in mine]
        tps = _tps(mine)
        mean, p50 = statistics.fmean(ttfts), percentile(ttfts, 50)
        stats[name] = (tps, mean, p50)
        same = sum(a.text == b.text for a, b in zip(mine, base, strict=True))
        paired = _paired_ratio(mine, base)
        table.add(
            name,
            sum(s.tokens for s in mine),
            f"{same}/{len(mine)}",
            tps,
            tps / base_tps,
            paired,
            mean,
            p50,
            percentile(ttfts, 95),
            mean - base_mean,
            p50 - base_p50,
            _ms(statistics.fmean(s.total for s in mine)),
            _ms(percentile([s.total - s.llm for s in mine if not math.isnan(s.llm)], 50)),
        )
        if name == "direct":
            continue
        short = name.removeprefix("chatprocessor ")
        outcome.targets += [
            Target(f"{short} tokens/s x direct (paired median)", paired, TPS_RATIO),
            Target(
                f"{short} TTFT mean - direct",
                mean - base_mean,
                TTFT_SLACK_MS,
                higher_is_better=False,
                unit=" ms",
            ),
            Target(
                f"{short} TTFT p50 - direct",
                p50 - base_p50,
                TTFT_SLACK_MS,
                higher_is_better=False,
                unit=" ms",
            ),
        ]
    outcome.notes.append(
        f"models loaded and warmed up ({sizes.warmup} untimed answers each) in {warm:.1f}s; "
        "requests one at a time, contestants take turns per prompt, order rotated each prompt; "
        "'x direct' is total tokens over total answer time against direct's, 'x direct paired' "
        "the median of per-answer ratios against direct's answer to the same prompt and round "
        "(robust to load bursts from other processes; the tokens/s target uses it); "
        "'outside LLM' is the answer time minus the LLM time the worker reports in the reply "
        "(latency_ms: from asking the provider to its last chunk, streamed chunks included)"
    )
    outcome.charts.append(_chart(options.out / "embedded.png", names, stats, base_tps))
    return outcome


def _chart(
    path: Path, names: Sequence[str], stats: dict[str, tuple[float, float, float]], base: float
) -> Path:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [name.replace("chatprocessor ", "chatprocessor\n") for name in names]
    bars = left.bar(labels, [stats[n][0] for n in names], color="#4878a8")
    left.bar_label(bars, labels=[f"{stats[n][0]:.1f}" for n in names], padding=2)
    left.axhline(TPS_RATIO * base, color="#c0392b", linestyle="--", label="target 0.95 x direct")
    left.set_title("tokens per second (higher is better)")
    left.set_ylabel("tokens/s")
    left.legend(loc="lower right")
    left.margins(y=0.15)
    width = 0.38
    xs = list(range(len(names)))
    for offset, index, label, color in (
        (-width / 2, 1, "mean", "#4878a8"),
        (width / 2, 2, "p50", "#8fb3d9"),
    ):
        values = [stats[n][index] for n in names]
        bars = right.bar([x + offset for x in xs], values, width, label=label, color=color)
        right.bar_label(bars, labels=[f"{v:.0f}" for v in values], padding=2)
    right.axhline(
        stats["direct"][1] + TTFT_SLACK_MS,
        color="#c0392b",
        linestyle="--",
        label="target: direct mean + 10 ms",
    )
    right.set_xticks(xs, labels)
    right.set_title("time to first token (lower is better)")
    right.set_ylabel("ms")
    right.axhline(
        stats["direct"][2] + TTFT_SLACK_MS,
        color="#c0392b",
        linestyle=":",
        label="target: direct p50 + 10 ms",
    )
    highest = max(max(stats[n][1], stats[n][2]) for n in names)
    right.set_ylim(0, max(highest, stats["direct"][1] + TTFT_SLACK_MS) * 1.4)
    right.legend(loc="upper center", ncol=2, fontsize="small")
    return save_chart(fig, path)


if __name__ == "__main__":
    if sys.argv[1:] != ["direct"]:
        sys.exit("usage: python -m bench.embedded direct  (the benchmark starts it)")
    run_loop(_serve_direct())
