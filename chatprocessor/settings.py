"""Every setting, its default and its validation.

Read once at the entry point (``Settings.load()``) from the environment and a
``.env`` file, then passed down as a typed object. Names and defaults of seed
000 are kept as they are; the rest are chatprocessor's own.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from chatprocessor.core.errors import ConfigError

PROVIDER_NAMES = ("embedded", "ollama", "openai", "mock")


def _writable(directory: Path, *, create: bool) -> bool:
    """Whether files can be written in ``directory`` (or, with ``create``, in the nearest
    existing parent it would be created under). Looks only: creates nothing."""
    probe = directory
    if create:
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "chatprocessor"


class TenantPolicy(BaseModel):
    """One tenant's entry in TENANTS; a field left out takes the TENANT_* default."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(None, ge=0)
    daily_budget: float | None = Field(None, ge=0)
    monthly_budget: float | None = Field(None, ge=0)
    content_filters: list[str] = Field(default_factory=list)

    @field_validator("content_filters")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        return _check_patterns(patterns)


def _check_patterns(patterns: list[str]) -> list[str]:
    import re

    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"bad regular expression {pattern!r}: {exc}") from exc
    return patterns


class Settings(BaseSettings):
    """chatprocessor's configuration; each field is an environment variable of the same name."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # Seed 000, names and defaults unchanged.
    rabbitmq_host: str = "localhost"
    rabbitmq_port: int = Field(5672, ge=1, le=65535)
    rabbitmq_username: str = "guest"
    rabbitmq_password: SecretStr = SecretStr("guest")
    rabbitmq_queue_input: str = Field("UserPromptReceived", min_length=1)
    rabbitmq_queue_output: str = Field("BotResponseCreated", min_length=1)
    ollama_base_url: str = "http://localhost:11434"
    ollama_model: str = Field("llama2", min_length=1)
    ollama_timeout: float = Field(300.0, gt=0)
    log_level: str = "INFO"
    prefetch_count: int = Field(1, ge=1, le=1000)

    # Where jobs come from and who answers them.
    transport: Literal["local", "rabbitmq", "kafka", "redis", "tasks"] = "local"
    #: chat: seed 000's UserPromptReceived; models: seed 001's photo/text requests;
    #: stream: seed 003's chat.request with answers as events on a Redis Stream;
    #: pipeline: seed 004's AIJob in three priority lanes, answered with an AIResponse;
    #: auto: models with TRANSPORT=kafka, stream with TRANSPORT=redis, chat otherwise.
    contract: Literal["auto", "chat", "models", "stream", "pipeline"] = "auto"
    providers: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["embedded"])

    # RabbitMQ, beyond the seed.
    rabbitmq_vhost: str = "/"
    rabbitmq_heartbeat: int = Field(60, ge=0)

    # Ollama, beyond the seed: connecting fails fast, reading waits OLLAMA_TIMEOUT.
    ollama_connect_timeout: float = Field(5.0, gt=0)
    #: Pull the configured model through /api/pull at start-up when /api/tags lacks it.
    pull_missing_models: bool = False

    # The streaming chat door (seed 003): CONTRACT=stream.
    #: Topic (Kafka), queue (RabbitMQ) or stream (Redis) of chat.request jobs.
    chat_request_topic: str = Field("chat.request", min_length=1)
    #: Where the answer's events go: a Redis Stream (SSE gateways) or a RabbitMQ exchange.
    events_sink: Literal["redis", "rabbitmq"] = "redis"
    events_stream: str = Field("sse:chat:events", min_length=1)
    events_stream_maxlen: int = Field(10_000, ge=100)
    events_exchange: str = Field("chat.events", min_length=1)
    #: Streamed tokens are batched for this long before one event (or chunk) is sent.
    stream_flush_ms: float = Field(5.0, ge=0, le=1000)
    #: Cancel requests: a Redis Stream every worker reads, or a RabbitMQ fanout exchange.
    cancel_stream: str = Field("sse:chat:cancel", min_length=1)
    cancel_exchange: str = Field("chat.cancel", min_length=1)
    #: Whose data a job may see when its door names no tenant.
    tenant_id: str = Field("default", min_length=1)

    # Conversation history (chat and stream doors): Redis with REDIS_URL, else SQLite.
    #: Unset: on for the stream door (seed 003 asks for it), off for seed 000's chat door,
    #: whose seed answers each prompt on its own (history costs it about 1 ms CPU per job).
    history_enabled: bool | None = None
    #: The context window sent to the model: system prompt, history, new message.
    history_max_tokens: int = Field(2048, ge=64)
    history_max_messages: int = Field(50, ge=0)
    history_ttl: float = Field(7 * 86_400.0, gt=0)

    # Job metrics (llm_jobs, llm_messages) and RAG documents: SQLite in DATA_DIR by default.
    database_url: str | None = None
    #: auto: on for the stream door, off for the others (their hot path stays as it is).
    job_metrics: Literal["auto", "on", "off"] = "auto"
    rag_top_k: int = Field(4, ge=1, le=50)
    rag_chunk_tokens: int = Field(300, ge=32, le=4000)
    rag_chunk_overlap: int = Field(40, ge=0)

    # The AI processing pipeline (seed 004): CONTRACT=pipeline.
    #: Three lanes, each a queue with priorities 1-10 (x-max-priority on RabbitMQ): priority
    #: >= HIGH_PRIORITY_MIN goes to high, type batch_processing to batch, the rest to standard.
    lane_high_queue: str = Field("ai-high-priority", min_length=1)
    lane_standard_queue: str = Field("ai-standard", min_length=1)
    lane_batch_queue: str = Field("ai-batch", min_length=1)
    high_priority_min: int = Field(8, ge=1, le=10)
    #: Jobs of a lane taken at once (the batch lane's one slot keeps a flood out of the worker).
    lane_high_prefetch: int = Field(4, ge=1, le=1000)
    lane_standard_prefetch: int = Field(2, ge=1, le=1000)
    lane_batch_prefetch: int = Field(1, ge=1, le=1000)
    #: Retries per lane (the seed's attempts minus one) and their first backoff, in seconds.
    lane_high_max_retries: int = Field(2, ge=0, le=100)
    lane_standard_max_retries: int = Field(4, ge=0, le=100)
    lane_batch_max_retries: int = Field(2, ge=0, le=100)
    lane_high_backoff: float = Field(2.0, gt=0)
    lane_standard_backoff: float = Field(5.0, gt=0)
    lane_batch_backoff: float = Field(5.0, gt=0)
    #: Deadline of one attempt per lane; 0 means JOB_TIMEOUT.
    lane_high_timeout: float = Field(0.0, ge=0)
    lane_standard_timeout: float = Field(0.0, ge=0)
    lane_batch_timeout: float = Field(300.0, ge=0)
    #: Model calls at once, highest priority first; 0: 1 with the embedded model, else 4.
    model_concurrency: int = Field(0, ge=0, le=1000)
    #: Where AIResponses go when a job names no reply_to.
    ai_response_queue: str = Field("ai-responses", min_length=1)
    #: Budget alerts (80 % and 95 %) are published here as JSON events.
    alerts_queue: str = Field("ai-alerts", min_length=1)
    #: chat_response jobs get intent, sentiment and suggested actions too (one more model call).
    classify_replies: bool = True

    # Tenants (any door): sliding-window rate limits and budgets in money.
    #: Requests per minute per tenant, 0 = no limit; TENANTS overrides it per tenant.
    tenant_requests_per_minute: int = Field(0, ge=0)
    tenant_daily_budget: float = Field(0.0, ge=0)
    tenant_monthly_budget: float = Field(0.0, ge=0)
    #: Per-tenant overrides as JSON (or a path to a JSON file): {"acme": {"requests_per_minute":
    #: 60, "daily_budget": 5, "monthly_budget": 100, "content_filters": ["(?i)secret"]}}.
    tenants: Annotated[dict[str, TenantPolicy], NoDecode] = Field(default_factory=dict)
    #: Regular expressions replaced in every tenant's answers (TENANTS adds per tenant).
    content_filters: Annotated[list[str], NoDecode] = Field(default_factory=list)
    content_filter_replacement: str = "[filtered]"

    # Costs and the usage ledger (ai_usage_logs in DATABASE_URL).
    #: Per 1,000 tokens, merged over the built-in table: {"gpt-4": {"input": 0.03, "output": 0.06}}.
    model_prices: dict[str, dict[str, float]] = Field(default_factory=dict)
    #: Per 1,000 tokens, for local models (embedded, Ollama) without a MODEL_PRICES entry.
    local_compute_price: float = Field(0.0, ge=0)
    cost_currency: str = Field("USD", min_length=1, max_length=8)
    #: auto: on for the pipeline door.
    usage_ledger: Literal["auto", "on", "off"] = "auto"

    # The response cache: Redis with REDIS_URL, else in process.
    #: auto: on for the pipeline door; on: every door (streamed jobs only with CACHE_STREAMING).
    cache_enabled: Literal["auto", "on", "off"] = "auto"
    cache_ttl: float = Field(300.0, ge=0)
    cache_max_entries: int = Field(10_000, ge=1)
    #: Streamed answers are cached too (a hit is sent as one piece).
    cache_streaming: bool = False
    #: How many of the latest context messages make part of the cache key (the seed's 3).
    cache_context_messages: int = Field(3, ge=0, le=100)

    # TRANSPORT=redis: Redis Streams with a consumer group.
    redis_stream_group: str = Field("chatprocessor", min_length=1)
    #: Deliveries after which an entry goes to <stream>.dlq (a crash loop cannot go on).
    redis_max_deliveries: int = Field(5, ge=1)
    #: Entries pending this long on a dead consumer are claimed by another (XAUTOCLAIM).
    redis_claim_idle: float = Field(60.0, gt=0)
    redis_stream_maxlen: int = Field(100_000, ge=100)

    # The task API door (seed 002, names and defaults kept): TRANSPORT=tasks.
    api_base_url: str = "http://localhost:3000"
    ory_project_slug: str = ""
    oauth2_token_url: str = ""
    oauth2_client_id: str = ""
    oauth2_client_secret: SecretStr = SecretStr("")
    polling_interval_seconds: float = Field(30.0, gt=0)
    concurrency_limit: int = Field(5, ge=1, le=1000)
    request_timeout: float = Field(30.0, gt=0)
    #: openai, ollama, hybrid (Ollama, then OpenAI on failure) or mock; empty: PROVIDERS.
    processing_mode: Literal["", "openai", "ollama", "hybrid", "mock"] = ""
    #: Models a task may ask for (JSON list or comma-separated); empty: any.
    supported_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    ollama_embedding_model: str = Field("nomic-embed-text", min_length=1)
    openai_embedding_model: str = Field("text-embedding-3-small", min_length=1)
    rate_limit_enabled: bool = True
    rate_limit_per_minute: int = Field(20, ge=0)
    rate_limit_per_hour: int = Field(100, ge=0)
    rate_limit_per_day: int = Field(500, ge=0)
    rate_limit_per_week: int = Field(2000, ge=0)
    rate_limit_per_month: int = Field(7500, ge=0)
    rate_limit_strategy: Literal["rolling", "fixed"] = "rolling"

    # Kafka and the Models Processor contract (seed 001, names and defaults kept).
    bootstrap_server: str = "localhost:9092"
    consumer_group: str = Field("models-processor-group", min_length=1)
    local_model_kafka_topic: str = Field("eater-send-photo", min_length=1)
    photo_response_topic: str = Field("photo-analysis-response", min_length=1)
    text_response_topic: str = Field("gemini-response", min_length=1)
    expected_user_email: str = ""
    #: Largest photo accepted, decoded (its base64 is checked before decoding).
    max_image_bytes: int = Field(10_485_760, ge=1024)
    #: Photos with a longer side are downscaled before they are sent; 0 keeps them as they are.
    image_max_side: int = Field(0, ge=0)
    #: A schema of chatprocessor/contracts/schemas the photo analysis must follow; "" = any JSON.
    photo_analysis_schema: str = "food_analysis"

    # An OpenAI-compatible server (api.openai.com, vLLM, llama_cpp.server, Ollama's /v1).
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: SecretStr = SecretStr("")
    openai_model: str = Field("gpt-4o-mini", min_length=1)
    openai_timeout: float = Field(300.0, gt=0)
    openai_connect_timeout: float = Field(5.0, gt=0)

    # Delivery guarantees: retries, deadlines, idempotency, circuit breaker.
    max_retries: int = Field(5, ge=0, le=100)
    retry_backoff_base: float = Field(1.0, gt=0)
    retry_backoff_cap: float = Field(300.0, gt=0)
    job_timeout: float = Field(600.0, gt=0)
    rabbitmq_consumer_timeout: float = Field(1800.0, ge=0)
    idempotency_ttl: int = Field(86_400, ge=0)
    redis_url: str | None = None
    breaker_fail_max: int = Field(5, ge=1)
    breaker_reset_timeout: float = Field(30.0, gt=0)

    # The embedded model (llama-cpp-python with the bundled Gemma 3 270M).
    embedded_model_path: Path | None = None
    embedded_context: int = Field(2048, ge=256)
    embedded_threads: int = Field(0, ge=0)
    embedded_max_tokens: int = Field(128, ge=1)

    # Jobs and replies.
    system_prompt: str = ""
    output_naming: Literal["snake", "camel", "pascal"] = "snake"
    bot_user_id: int = 0
    max_message_bytes: int = Field(1_048_576, ge=256)
    graceful_timeout: float = Field(30.0, ge=0)

    # Local transport and files.
    data_dir: Path = Field(default_factory=_default_data_dir)
    local_visibility_timeout: float = Field(30.0, gt=0)

    # Operations.
    ops_host: str = "0.0.0.0"
    ops_port: int = Field(8001, ge=0, le=65535)
    log_file: str = "chatprocessor.log"
    log_format: Literal["text", "json"] = "text"

    @field_validator("supported_models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)  # the seed writes ["nomic-embed-text","all-minilm"]
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("tenants", mode="before")
    @classmethod
    def _read_tenants(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return {}
            if not text.startswith("{"):  # a path to a JSON file
                path = Path(text).expanduser()
                try:
                    text = path.read_text(encoding="utf-8")
                except OSError as exc:
                    raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
            import json

            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from exc
        return value

    @field_validator("content_filters", mode="before")
    @classmethod
    def _split_filters(cls, value: Any) -> Any:
        if isinstance(value, str):
            import json

            text = value.strip()
            if not text:
                return []
            if not text.startswith("["):
                raise ValueError('expected a JSON list of regular expressions, e.g. ["(?i)secret"]')
            return json.loads(text)
        return value

    @field_validator("content_filters")
    @classmethod
    def _filters_compile(cls, patterns: list[str]) -> list[str]:
        return _check_patterns(patterns)

    @field_validator("model_prices")
    @classmethod
    def _check_prices(cls, value: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for model, price in value.items():
            for part in ("input", "output"):
                amount = price.get(part)
                if amount is None or amount < 0:
                    raise ValueError(
                        f"{model!r} needs {part!r}: a price per 1,000 tokens >= 0, e.g. "
                        '{"gpt-4": {"input": 0.03, "output": 0.06}}'
                    )
        return value

    def tenant_policy(self, tenant: str) -> TenantPolicy:
        """The tenant's limits with the TENANT_* defaults filled in (filters: its own + global)."""
        own = self.tenants.get(tenant) or TenantPolicy()
        return TenantPolicy(
            requests_per_minute=self.tenant_requests_per_minute
            if own.requests_per_minute is None
            else own.requests_per_minute,
            daily_budget=self.tenant_daily_budget if own.daily_budget is None else own.daily_budget,
            monthly_budget=self.tenant_monthly_budget
            if own.monthly_budget is None
            else own.monthly_budget,
            content_filters=[*self.content_filters, *own.content_filters],
        )

    @property
    def database(self) -> str:
        """The SQLAlchemy URL of DATABASE_URL, or of the SQLite file in DATA_DIR when unset
        (job metrics and the usage ledger)."""
        from chatprocessor.stores.database import database_url

        return database_url(self.database_url, self.data_dir.expanduser())

    @property
    def uses_pipeline_contract(self) -> bool:
        return self.contract == "pipeline"

    @property
    def lanes(self) -> dict[str, str]:
        """Lane name -> its queue (the pipeline door)."""
        return {
            "high": self.lane_high_queue,
            "standard": self.lane_standard_queue,
            "batch": self.lane_batch_queue,
        }

    @property
    def uses_rate_limits(self) -> bool:
        return bool(self.tenant_requests_per_minute) or any(
            policy.requests_per_minute for policy in self.tenants.values()
        )

    @property
    def uses_budgets(self) -> bool:
        defaults = self.tenant_daily_budget or self.tenant_monthly_budget
        return bool(defaults) or any(
            policy.daily_budget or policy.monthly_budget for policy in self.tenants.values()
        )

    @property
    def uses_content_filters(self) -> bool:
        return bool(self.content_filters) or any(p.content_filters for p in self.tenants.values())

    @property
    def writes_usage_ledger(self) -> bool:
        return self.usage_ledger == "on" or (
            self.usage_ledger == "auto" and self.uses_pipeline_contract
        )

    @property
    def uses_cache(self) -> bool:
        return self.cache_ttl > 0 and (
            self.cache_enabled == "on"
            or (self.cache_enabled == "auto" and self.uses_pipeline_contract)
        )

    @property
    def model_slots(self) -> int:
        """MODEL_CONCURRENCY, with 0 meaning 1 for the embedded model (one at a time) else 4."""
        if self.model_concurrency:
            return self.model_concurrency
        return 1 if self.provider_names[0] == "embedded" else 4

    @property
    def provider_names(self) -> list[str]:
        """PROCESSING_MODE, when set, chooses the providers; else PROVIDERS."""
        modes = {"openai": ["openai"], "ollama": ["ollama"], "hybrid": ["ollama", "openai"]}
        modes["mock"] = ["mock"]
        return modes.get(self.processing_mode, self.providers)

    @field_validator("photo_analysis_schema")
    @classmethod
    def _known_schema(cls, value: str) -> str:
        if value:
            from chatprocessor.sanitize import load_schema

            load_schema(value)  # ValueError naming the shipped schemas
        return value

    @property
    def uses_models_contract(self) -> bool:
        return self.contract == "models" or (self.contract == "auto" and self.transport == "kafka")

    @property
    def uses_stream_contract(self) -> bool:
        return self.contract == "stream" or (self.contract == "auto" and self.transport == "redis")

    @property
    def uses_history(self) -> bool:
        if self.history_enabled is None:
            return self.uses_stream_contract
        return self.history_enabled

    @property
    def writes_job_metrics(self) -> bool:
        return self.job_metrics == "on" or (
            self.job_metrics == "auto" and self.uses_stream_contract
        )

    @property
    def input_queue(self) -> str:
        """Where jobs come from: seed 001's topic for the models contract, else seed 000's."""
        if self.transport == "tasks":
            return "ai-tasks"
        if self.uses_models_contract:
            return self.local_model_kafka_topic
        if self.uses_stream_contract:
            return self.chat_request_topic
        if self.uses_pipeline_contract:
            return self.lane_standard_queue
        return self.rabbitmq_queue_input

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip().lower() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            if not value:
                raise ValueError("at least one provider is needed")
            unknown = [name for name in value if name not in PROVIDER_NAMES]
            if unknown:
                choices = ", ".join(PROVIDER_NAMES)
                raise ValueError(f"unknown provider(s) {', '.join(unknown)}; choose from {choices}")
        return value

    @field_validator("ollama_base_url", "openai_base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parsed = urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(
                "expected an http(s) URL such as http://localhost:11434 or https://api.openai.com/v1"
            )
        return value.rstrip("/")

    @field_validator("embedded_model_path")
    @classmethod
    def _check_model_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @field_validator("log_file")
    @classmethod
    def _check_log_file(cls, value: str) -> str:
        if value and not _writable(Path(value).expanduser().absolute().parent, create=False):
            raise ValueError(f"cannot write {value}: its directory is missing or read-only")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parsed = urlsplit(value)
        if parsed.scheme not in ("redis", "rediss", "unix") or not (parsed.hostname or parsed.path):
            raise ValueError("expected a URL such as redis://localhost:6379/0")
        return value

    @property
    def uses_data_dir(self) -> bool:
        """The local transport, the idempotency and history stores without REDIS_URL, and
        job metrics without DATABASE_URL keep files there."""
        local_store = (self.idempotency_ttl > 0 or self.uses_history) and self.redis_url is None
        local_db = (self.writes_job_metrics or self.writes_usage_ledger) and not self.database_url
        return self.transport == "local" or local_store or local_db

    @model_validator(mode="after")
    def _check_data_dir(self) -> Settings:
        if self.uses_data_dir and not _writable(self.data_dir.expanduser(), create=True):
            raise ValueError(
                f"DATA_DIR {self.data_dir} cannot be created or written (set DATA_DIR)"
            )
        return self

    @model_validator(mode="after")
    def _check_delivery(self) -> Settings:
        if self.retry_backoff_cap < self.retry_backoff_base:
            raise ValueError(
                f"RETRY_BACKOFF_CAP ({self.retry_backoff_cap}) must not be below "
                f"RETRY_BACKOFF_BASE ({self.retry_backoff_base})"
            )
        # A job must end (reply or retry) before RabbitMQ closes the channel for holding it.
        if (
            self.transport == "rabbitmq"
            and self.rabbitmq_consumer_timeout
            and self.job_timeout >= self.rabbitmq_consumer_timeout
        ):
            raise ValueError(
                f"JOB_TIMEOUT ({self.job_timeout:g}s) must be shorter than "
                f"RABBITMQ_CONSUMER_TIMEOUT ({self.rabbitmq_consumer_timeout:g}s, the broker's "
                "consumer_timeout)"
            )
        if self.transport == "redis" and not self.redis_url:
            raise ValueError("TRANSPORT=redis needs REDIS_URL (e.g. redis://localhost:6379/0)")
        if self.uses_stream_contract and self.events_sink == "redis" and not self.redis_url:
            raise ValueError(
                "CONTRACT=stream sends its events to a Redis Stream: set REDIS_URL "
                "(or EVENTS_SINK=rabbitmq)"
            )
        if self.uses_pipeline_contract and self.transport not in ("local", "rabbitmq"):
            raise ValueError(
                "CONTRACT=pipeline needs TRANSPORT=rabbitmq or local (its lanes are queues)"
            )
        if self.uses_pipeline_contract and len(set(self.lanes.values())) < 3:
            raise ValueError(
                "LANE_HIGH_QUEUE, LANE_STANDARD_QUEUE and LANE_BATCH_QUEUE must differ"
            )
        if self.uses_stream_contract and self.transport in ("tasks",):
            raise ValueError("CONTRACT=stream needs TRANSPORT=kafka, rabbitmq, redis or local")
        if (
            "openai" in self.providers
            and urlsplit(self.openai_base_url).hostname == "api.openai.com"
            and not self.openai_api_key.get_secret_value()
        ):
            raise ValueError("OPENAI_API_KEY is required for api.openai.com")
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _check_level(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().upper()
            if value not in logging.getLevelNamesMapping():
                raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        from chatprocessor.stores.database import database_url

        try:
            database_url(value, Path("."))
        except ConfigError as exc:
            raise ValueError(str(exc).split("DATABASE_URL: ", 1)[-1]) from exc
        return value

    @field_validator(
        "transport",
        "contract",
        "log_format",
        "output_naming",
        "events_sink",
        "job_metrics",
        "usage_ledger",
        "cache_enabled",
        mode="before",
    )
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def rabbitmq_url(self) -> str:
        """AMQP URL including the password; never log it, log ``rabbitmq_safe_url``."""
        from urllib.parse import quote

        return (
            f"amqp://{quote(self.rabbitmq_username, safe='')}:"
            f"{quote(self.rabbitmq_password.get_secret_value(), safe='')}@"
            f"{self.rabbitmq_host}:{self.rabbitmq_port}/{quote(self.rabbitmq_vhost, safe='')}"
            f"?heartbeat={self.rabbitmq_heartbeat}"
        )

    @property
    def rabbitmq_safe_url(self) -> str:
        """The broker address for logs, without the password."""
        return f"amqp://{self.rabbitmq_username}:***@{self.rabbitmq_host}:{self.rabbitmq_port}/"

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Read the environment and ``.env``; raise ConfigError naming each bad variable."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from exc


#: Variables the LLM client libraries read by themselves (OPENAI_ORG_ID, OLLAMA_HOST, ...).
CLIENT_ENV_PREFIXES = ("OPENAI_", "OLLAMA_")


def is_setting_variable(name: str) -> bool:
    """Whether an environment variable configures chatprocessor or its LLM clients (tests and
    benchmarks strip these to run with known settings)."""
    return name.lower() in Settings.model_fields or name.upper().startswith(CLIENT_ENV_PREFIXES)


def describe_validation_error(exc: ValidationError) -> str:
    """One line per bad variable, named as the user writes it in the environment."""
    lines = []
    for error in exc.errors():
        if not error["loc"]:  # a check across settings: its message names the variable
            lines.append(str(error["msg"]).removeprefix("Value error, "))
            continue
        name = str(error["loc"][0]).upper()
        given = error.get("input")
        secret = name.endswith(("PASSWORD", "KEY")) or name == "REDIS_URL"
        shown = "" if isinstance(given, dict) or secret else f" (got {given!r})"
        lines.append(f"{name}: {error['msg']}{shown}")
    return "invalid configuration: " + "; ".join(lines)
