"""One exception tree for the whole project.

Adapters translate their library's errors into these at the boundary
(``raise ProviderTimeout(...) from exc``), so the engine decides retry or
dead-letter from the class alone::

    ChatProcessorError
    ├── ConfigError                  bad setting: startup stops, exit status 2
    ├── NotForUs                     not an error: a filtered message, acked and counted unread
    ├── MessageRejected              permanent: the input itself is bad
    │   ├── MessageTooLarge          over MAX_MESSAGE_BYTES, checked before parsing
    │   ├── MalformedMessage         not UTF-8 JSON, too deep, or not the contract's schema
    │   │   └── ImageRejected        an attached image: not strict base64, too big, not an image
    │   └── Forbidden                the sender may not ask for this
    ├── ProviderError
    │   ├── ProviderUnavailable      transient: connection refused, 5xx
    │   │   └── CircuitOpen          transient: skipped while its circuit breaker is open
    │   ├── ProviderTimeout          transient: no answer within the deadline (or JOB_TIMEOUT)
    │   ├── RateLimited              transient: 429, carries retry_after
    │   ├── BadRequest               permanent: the provider refused the request
    │   │   └── ModelNotFound        the model is not installed on the provider
    │   └── InvalidModelOutput       permanent: no valid JSON in the answer, even after a repair
    ├── TenantLimit                  a tenant's own limits (seed 004), before any model call
    │   ├── TenantRateLimited        transient: over its requests per minute; carries retry_after
    │   └── BudgetExceeded           permanent: over its daily or monthly budget
    ├── TransportError
    │   ├── BrokerUnavailable        transient: cannot reach the broker
    │   └── PublishFailed            the broker refused a publish (nack)
    │       └── Unroutable           returned: no queue of that name (mandatory)
    └── StoreUnavailable             transient: the idempotency store (SQLite, Redis) failed
"""

from __future__ import annotations


class ChatProcessorError(Exception):
    """Root of every error chatprocessor raises on purpose."""

    #: True when trying again later may succeed.
    transient: bool = False


class ConfigError(ChatProcessorError):
    """A setting is missing or invalid."""


class NotForUs(ChatProcessorError):
    """The message is for another consumer (e.g. EXPECTED_USER_EMAIL does not match): it is
    acknowledged and counted, never processed or dead-lettered."""


class MessageRejected(ChatProcessorError):
    """The incoming message can never be processed; it is dead-lettered at once."""


class MessageTooLarge(MessageRejected):
    """The message body is larger than MAX_MESSAGE_BYTES."""


class MalformedMessage(MessageRejected):
    """The body is not valid JSON or does not match the contract."""


class ImageRejected(MalformedMessage):
    """An attached image is not strict base64, is too big, or is not an allowed image format."""


class Forbidden(MessageRejected):
    """The message asks for something its sender may not have."""


class ProviderError(ChatProcessorError):
    """An LLM provider failed to answer."""

    transient = True

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        #: Seconds the provider (or its circuit breaker) asks us to wait before trying again.
        self.retry_after = retry_after


class ProviderUnavailable(ProviderError):
    """The provider cannot be reached or answered with a server error."""


class CircuitOpen(ProviderUnavailable):
    """The provider failed repeatedly; it is skipped until its cool-down ends."""


class ProviderTimeout(ProviderError):
    """The provider did not answer in time."""


class RateLimited(ProviderError):
    """The provider asked us to slow down."""


class BadRequest(ProviderError):
    """The provider refused the request itself; retrying cannot help."""

    transient = False


class ModelNotFound(BadRequest):
    """The requested model is not available on the provider."""


class InvalidModelOutput(ProviderError):
    """The model was asked for JSON and its answer holds none that is valid (after one repair
    attempt). Permanent: asking the same model the same thing again gives the same kind of
    answer."""

    transient = False


class TenantLimit(ChatProcessorError):
    """A tenant's own limit stops the job before any model call."""


class TenantRateLimited(TenantLimit):
    """The tenant is over its requests per minute: the job waits (no attempt is used)."""

    transient = True

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        #: Seconds until the tenant's window has room again.
        self.retry_after = retry_after


class BudgetExceeded(TenantLimit):
    """The tenant spent its daily or monthly budget: the job is refused with an error reply
    and dead-lettered (replayable once the budget allows it)."""

    def __init__(
        self, message: str, *, tenant: str, period: str, used: float, limit: float
    ) -> None:
        super().__init__(message)
        self.tenant = tenant
        #: "daily" or "monthly".
        self.period = period
        self.used = used
        self.limit = limit


class TransportError(ChatProcessorError):
    """The broker or queue failed."""

    transient = True


class BrokerUnavailable(TransportError):
    """The broker cannot be reached."""


class PublishFailed(TransportError):
    """The broker did not take responsibility for a published message."""


class Unroutable(PublishFailed):
    """The destination queue does not exist: the broker returned the message."""


class StoreUnavailable(ChatProcessorError):
    """A state store (the idempotency store) cannot be read or written."""

    transient = True
