"""Redis Streams behind the Transport protocol (``TRANSPORT=redis``).

- A queue is a stream read by one consumer group (REDIS_STREAM_GROUP); each process
  is one consumer of it (``host-pid-random``). An entry holds the message as fields:
  ``body`` plus ``message_id``, ``correlation_id``, ``reply_to``, ``type``,
  ``content_type`` and ``headers`` (JSON). An entry written by another producer
  without a ``body`` field is read as the JSON object of its fields.
- Settling is one Lua script per delivery, so the copy and the removal of the
  original happen together or not at all: ack is XACK + XDEL; retry puts a copy in
  the ZSET ``<queue>:delayed`` (score: due epoch ms) that consumers move back to the
  stream when due; dead-lettering appends a copy to ``<queue>.dlq``; release appends
  a copy at the tail of the queue, so another consumer takes it at once. Scripts
  other than ack first check the entry is still ours: a consumer that was presumed
  dead and lost it must not add a second copy.
- An entry held by a live consumer is touched (XCLAIM JUSTID) every third of
  REDIS_CLAIM_IDLE; entries of dead consumers idle longer than that are taken over
  with XAUTOCLAIM. An entry delivered more than REDIS_MAX_DELIVERIES times (a worker
  dying on it each time) goes to the dead-letter stream with reason ``poison``.
- ``publish`` returns once XADD returned: Redis has no publisher confirm, so a
  message survives a Redis crash only as far as its AOF/replication settings allow
  (``appendonly yes``, ``appendfsync everysec`` or ``always``). Streams are created
  on write, so only private reply streams can be "unroutable".

Scripts name several keys, so this needs a single Redis (or Sentinel), not Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from chatprocessor.core.errors import (
    BrokerUnavailable,
    PublishFailed,
    TransportError,
    Unroutable,
)
from chatprocessor.transports.base import (
    DLQ_QUEUE,
    RETRY_AT_HEADER,
    DeadLetter,
    Delivery,
    Outgoing,
    dead_letter_name,
    header_number,
    replay_headers,
)

log = logging.getLogger(__name__)

#: Dead-letter reason of an entry delivered more than REDIS_MAX_DELIVERIES times.
POISON = "poison"
#: Private reply streams (``open_reply_queue``); publishing to a missing one is Unroutable.
REPLY_PREFIX = "chatprocessor:reply:"
#: A reply stream whose reader died without closing it expires after this long.
REPLY_TTL_MS = 3_600_000
DELAYED_SUFFIX = ":delayed"
#: Field counting earlier deliveries of a released entry (its copy starts a new count).
DELIVERIES_FIELD = b"deliveries"
#: How long one XREADGROUP blocks, and so how often due retries are moved back.
_TICK = 0.2
_MOVE_BATCH = 100
_REPLY_BLOCK_MS = 1000
#: No Redis call (a BLOCK included) may take longer: the connection is presumed dead.
COMMAND_TIMEOUT = 10.0
_BACKOFF_START = 0.5
_BACKOFF_CAP = 30.0
#: Consumers with nothing pending and idle this long (crashed processes) leave the group.
_STALE_CONSUMER_MS = 86_400_000
_CONNECTION_ERRORS = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    OSError,
    TimeoutError,
)

_OWNED = """
local function owned(stream, group, consumer, id)
  local p = redis.pcall('XPENDING', stream, group, id, id, 1)
  if type(p) ~= 'table' or p.err or #p ~= 1 then return nil end
  if p[1][2] ~= consumer then return nil end
  return p[1]
end
"""

#: KEYS: stream, target. ARGV: group, consumer, id, mode, score, payload...
#: mode ack: XACK + XDEL; xadd: copy (payload: fields) to target first; zadd: payload
#: (one member) into the target ZSET first. Returns 0 when the entry is not ours.
_SETTLE = (
    _OWNED
    + """
local group, consumer, id, mode = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if mode ~= 'ack' and not owned(KEYS[1], group, consumer, id) then return 0 end
if mode == 'xadd' then
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 6))
elseif mode == 'zadd' then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[6])
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.pcall('XACK', KEYS[1], group, id)
  redis.call('XDEL', KEYS[1], id)
end
return 1
"""
)

#: KEYS: stream. ARGV: group, consumer, bump (1: count this delivery), ids...
#: Each entry still ours is appended again at the tail and the original removed;
#: returns how many were ours.
_REQUEUE = (
    _OWNED
    + """
local group, consumer, bump = ARGV[1], ARGV[2], ARGV[3]
local moved = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local p = owned(KEYS[1], group, consumer, id)
  if p then
    local entry = redis.call('XRANGE', KEYS[1], id, id)
    if #entry == 1 then
      local fields, seen, kv = {}, 0, entry[1][2]
      for j = 1, #kv, 2 do
        if kv[j] == 'deliveries' then
          seen = tonumber(kv[j + 1]) or 0
        else
          fields[#fields + 1] = kv[j]
          fields[#fields + 1] = kv[j + 1]
        end
      end
      if bump == '1' then seen = seen + p[4] end
      if seen > 0 then
        fields[#fields + 1] = 'deliveries'
        fields[#fields + 1] = tostring(seen)
      end
      redis.call('XADD', KEYS[1], '*', unpack(fields))
    end
    redis.call('XACK', KEYS[1], group, id)
    redis.call('XDEL', KEYS[1], id)
    moved = moved + 1
  end
end
return moved
"""
)

#: KEYS: stream. ARGV: group, consumer, ids... Resets the idle time of entries still
#: ours (JUSTID: the delivery count stays); returns those ids.
_TOUCH = (
    _OWNED
    + """
local kept = {}
for i = 3, #ARGV do
  if owned(KEYS[1], ARGV[1], ARGV[2], ARGV[i]) then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept[#kept + 1] = ARGV[i]
  end
end
return kept
"""
)

#: KEYS: delayed ZSET, stream. ARGV: now (epoch ms), limit. Members are a 32-character
#: unique id followed by ``<length>:<bytes>`` for each field name and value.
_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  local fields, pos, ok = {}, 33, true
  while pos <= #member do
    local colon = string.find(member, ':', pos, true)
    local n = colon and tonumber(string.sub(member, pos, colon - 1))
    if not n then ok = false break end
    fields[#fields + 1] = string.sub(member, colon + 1, colon + n)
    pos = colon + n + 1
  end
  if ok and #fields > 0 and #fields % 2 == 0 then
    redis.call('XADD', KEYS[2], '*', unpack(fields))
  else
    redis.log(redis.LOG_WARNING, 'chatprocessor: dropping a malformed member of ' .. KEYS[1])
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""

#: KEYS: stream. ARGV: fields. Appends only to an existing stream (a reply stream).
_XADD_EXISTING = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('XADD', KEYS[1], '*', unpack(ARGV))
return 1
"""


def safe_url(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def delayed_name(queue: str) -> str:
    return queue + DELAYED_SUFFIX


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def dump_headers(headers: dict[str, Any]) -> bytes:
    return orjson.dumps(headers, default=_jsonable, option=orjson.OPT_NON_STR_KEYS)


def encode_fields(message: Outgoing) -> dict[bytes, bytes]:
    """The stream fields of ``message`` (absent properties are left out)."""
    fields: dict[bytes, bytes] = {b"body": message.body}
    for name, value in (
        (b"message_id", message.message_id),
        (b"correlation_id", message.correlation_id),
        (b"reply_to", message.reply_to),
        (b"type", message.type),
        (b"content_type", message.content_type),
    ):
        if value is not None:
            fields[name] = value.encode()
    if message.headers:
        fields[b"headers"] = dump_headers(message.headers)
    return fields


def _pack(fields: dict[bytes, bytes]) -> bytes:
    """A delayed-ZSET member: a unique id, then each name and value as ``<len>:<bytes>``."""
    parts = [uuid.uuid4().hex.encode()]
    for name, value in fields.items():
        parts += [b"%d:" % len(name), name, b"%d:" % len(value), value]
    return b"".join(parts)


def _flat(fields: dict[bytes, bytes]) -> list[bytes]:
    return [item for pair in fields.items() for item in pair]


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _as_fields(raw: Any) -> dict[bytes, bytes]:
    if isinstance(raw, dict):
        return {_bytes(k): _bytes(v) for k, v in raw.items()}
    items = list(raw)
    return {_bytes(items[i]): _bytes(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _entries(response: Any) -> list[tuple[str, dict[bytes, bytes]]]:
    """The entries of an XREAD/XREADGROUP answer for one stream (RESP2 list or RESP3 map)."""
    if not response:
        return []
    streams = response.values() if isinstance(response, dict) else [s[1] for s in response]
    found: list[tuple[str, dict[bytes, bytes]]] = []
    for entries in streams:
        for entry in entries or []:
            entry_id, raw = entry[0], entry[1]
            if raw is not None:
                found.append((_str(entry_id), _as_fields(raw)))
    return found


class RedisDelivery(Delivery):
    """A stream entry; settling it runs one script that checks the entry is still ours."""

    def __init__(
        self,
        transport: RedisStreamsTransport | None,
        queue: str,
        entry_id: str,
        fields: dict[bytes, bytes],
        deliveries: int = 1,
    ) -> None:
        self._transport = transport
        self.queue = queue
        self.entry_id = entry_id
        self.fields = fields
        body = fields.get(b"body")
        if body is None:  # written by another producer: keep every field
            body = orjson.dumps({_text(k): _text(v) for k, v in fields.items()})
        self.body = body
        self.message_id = _text(fields.get(b"message_id"))
        self.correlation_id = _text(fields.get(b"correlation_id"))
        self.reply_to = _text(fields.get(b"reply_to"))
        self.type = _text(fields.get(b"type"))
        self.content_type = _text(fields.get(b"content_type"))
        self.headers = _headers(fields.get(b"headers"))
        #: Deliveries of this entry (XPENDING), plus those of the copies it was released from.
        self.deliveries = deliveries + _count(fields.get(DELIVERIES_FIELD))
        self.delivery_count = deliveries
        self.redelivered = self.deliveries > 1
        #: False while it waits in the consumer's buffer, not yet handed out.
        self.handed_out = False
        self.reader: _Reader | None = None
        if transport is None:  # a reply-stream message: read, nothing to settle
            self.settled = True

    def copy_fields(self, headers: dict[str, Any]) -> dict[bytes, bytes]:
        """The entry's fields with other headers, for a delayed or dead-letter copy."""
        fields = {k: v for k, v in self.fields.items() if k != DELIVERIES_FIELD}
        fields.setdefault(b"body", self.body)  # so the copy reads as this one did
        fields[b"headers"] = dump_headers(headers)
        return fields

    def _owner(self) -> RedisStreamsTransport:
        assert self._transport is not None
        return self._transport

    async def _ack(self) -> None:
        await self._owner().settle(self, "ack")

    async def _dead_letter(self, error: str, headers: dict[str, Any]) -> None:
        await self._owner().settle(
            self, "xadd", dead_letter_name(self.queue), payload=_flat(self.copy_fields(headers))
        )

    async def _retry(self, delay: float, headers: dict[str, Any]) -> None:
        fields = self.copy_fields(headers)
        if delay <= 0:
            await self._owner().settle(self, "xadd", self.queue, payload=_flat(fields))
            return
        due = header_number(headers, RETRY_AT_HEADER) or math.ceil((time.time() + delay) * 1000)
        await self._owner().settle(
            self, "zadd", delayed_name(self.queue), score=int(due), payload=[_pack(fields)]
        )

    async def _release(self) -> None:
        await self._owner().requeue(self)


def _count(raw: bytes | None) -> int:
    try:
        return max(0, int(raw or 0))
    except ValueError:
        return 0


def _headers(raw: bytes | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        headers = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return headers if isinstance(headers, dict) else {}


class _Reader:
    """One ``consume()``: its entries not settled yet, within ``prefetch``."""

    def __init__(self, queue: str, prefetch: int) -> None:
        self.queue = queue
        self.prefetch = max(1, prefetch)
        self.unsettled: set[str] = set()
        self.freed = asyncio.Event()
        #: Fetched (and counted in ``unsettled``), not handed out yet.
        self.buffer: deque[RedisDelivery] = deque()
        self.next_move = self.next_claim = 0.0
        self.cursor = "0-0"  # XAUTOCLAIM's, between calls
        self.backoff = _BACKOFF_START

    @property
    def free(self) -> int:
        return self.prefetch - len(self.unsettled)


class RedisReplyQueue:
    """A private stream read with XREAD (no group); deleted on close, expires if forgotten."""

    def __init__(self, transport: RedisStreamsTransport, name: str) -> None:
        self._transport = transport
        self.name = name

    async def messages(self) -> AsyncIterator[Delivery]:
        last = "0-0"
        expire_at = time.monotonic() + REPLY_TTL_MS / 2000
        while True:
            async with self._transport.translated(f"reading {self.name!r}"):
                client = self._transport.client
                response = await client.xread({self.name: last}, count=100, block=_REPLY_BLOCK_MS)
                if time.monotonic() > expire_at:  # still read: keep it alive
                    await client.pexpire(self.name, REPLY_TTL_MS)
                    expire_at = time.monotonic() + REPLY_TTL_MS / 2000
            for entry_id, fields in _entries(response):
                last = entry_id
                yield RedisDelivery(None, self.name, entry_id, fields)

    async def close(self) -> None:
        with contextlib.suppress(TransportError):
            async with self._transport.translated("deleting"):
                await self._transport.client.delete(self.name)


class RedisStreamsTransport:
    """Queues as Redis Streams with one consumer group; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        group: str = "chatprocessor",
        max_deliveries: int = 5,
        claim_idle: float = 60.0,
        maxlen: int = 100_000,
        consumer: str | None = None,
    ) -> None:
        self.url = url
        self.safe_url = safe_url(url)
        self.group = group
        self.max_deliveries = max_deliveries
        self.claim_idle = claim_idle
        self.maxlen = maxlen
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._held: dict[tuple[str, str], RedisDelivery] = {}
        self._readers: dict[tuple[str, str], _Reader] = {}
        self._queues: set[str] = set()
        self._renewer: asyncio.Task[None] | None = None

    # -- plumbing --------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The redis-py client (made on first use: it connects lazily)."""
        if self._client is None:
            # socket_timeout=None (redis-py 8 defaults to 5 s): with one, redis-py sends
            # through asyncio.wait_for, which on Python 3.11 can swallow a cancellation (a
            # consumer then never stops); translated() bounds each call with asyncio.timeout.
            self._client = aioredis.Redis.from_url(
                self.url,
                socket_connect_timeout=5,
                socket_timeout=None,
                socket_keepalive=True,
                health_check_interval=30,
            )
            self._scripts = {
                name: self._client.register_script(source)
                for name, source in (
                    ("settle", _SETTLE),
                    ("requeue", _REQUEUE),
                    ("touch", _TOUCH),
                    ("move", _MOVE_DUE),
                    ("xadd_existing", _XADD_EXISTING),
                )
            }
        return self._client

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        _ = self.client  # makes the scripts
        return await self._scripts[name](keys=keys, args=args)

    @contextlib.asynccontextmanager
    async def translated(
        self, what: str, refused: type[TransportError] = TransportError
    ) -> AsyncIterator[None]:
        """Redis errors as the project's: unreachable (or no answer within COMMAND_TIMEOUT)
        is BrokerUnavailable, an error answer (OOM, WRONGTYPE...) is ``refused``."""
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                yield
        except _CONNECTION_ERRORS as exc:
            raise BrokerUnavailable(f"{what}: Redis at {self.safe_url}: {exc}") from exc
        except redis_errors.RedisError as exc:
            raise refused(f"{what}: Redis refused: {exc}") from exc

    async def connect(self, *, attempts: int | None = None) -> None:
        """PING until Redis answers, with exponential backoff; ``attempts=None``: forever."""
        delay = _BACKOFF_START
        tried = 0
        while True:
            tried += 1
            try:
                async with self.translated("connect"):
                    await self.client.ping()
                break
            except BrokerUnavailable as exc:
                if attempts is not None and tried >= attempts:
                    raise
                log.warning("Redis not reachable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_CAP)
        log.info("connected to Redis at %s as consumer %s", self.safe_url, self.consumer)

    async def declare(self, queue: str) -> None:
        """Create the stream and the group (from the start: earlier entries are taken too)."""
        async with self.translated(f"declaring {queue!r}"):
            try:
                await self.client.xgroup_create(queue, self.group, id="0", mkstream=True)
            except redis_errors.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def declare_input(self, queue: str) -> None:
        """The input stream and group; ``.dlq`` and ``:delayed`` are created on first write."""
        await self.declare(queue)

    async def publish(self, destination: str, message: Outgoing) -> None:
        """XADD, trimming the stream to about REDIS_STREAM_MAXLEN entries (the oldest go)."""
        fields = encode_fields(message)
        async with self.translated(f"publish to {destination!r}", PublishFailed):
            if destination.startswith(REPLY_PREFIX):
                if not await self._script("xadd_existing", [destination], _flat(fields)):
                    raise Unroutable(f"reply stream {destination} does not exist (requester gone)")
                return
            await self.client.xadd(
                destination, fields, maxlen=self.maxlen or None, approximate=True
            )

    async def open_reply_queue(self) -> RedisReplyQueue:
        name = f"{REPLY_PREFIX}{uuid.uuid4().hex}"
        async with (
            self.translated("opening a reply stream"),
            self.client.pipeline(transaction=True) as pipe,
        ):
            # MAXLEN 0: the stream exists, empty, so publishers can tell it from a gone one.
            pipe.xadd(name, {b"open": b"1"}, maxlen=0, approximate=False)
            pipe.pexpire(name, REPLY_TTL_MS)
            await pipe.execute()
        return RedisReplyQueue(self, name)

    async def ping(self) -> bool:
        try:
            async with self.translated("ping"):
                return bool(await self.client.ping())
        except TransportError:
            return False

    # -- consuming -------------------------------------------------------------------------

    async def consume(self, queue: str, prefetch: int) -> AsyncIterator[Delivery]:
        """XREADGROUP for new entries, XAUTOCLAIM for those of dead consumers, and due
        retries moved back, in one loop; survives Redis outages (retrying with backoff)."""
        await self.declare(queue)
        reader = _Reader(queue, prefetch)
        key = (queue, uuid.uuid4().hex)
        self._readers[key] = reader
        self._queues.add(queue)
        self._start_renewer()
        buffer = reader.buffer
        try:
            while True:
                while buffer:
                    delivery = buffer.popleft()
                    delivery.handed_out = True
                    yield delivery
                await self._fill(reader)
        finally:
            del self._readers[key]
            if buffer:  # fetched, never handed out: back to the queue, uncounted
                ids = [d.entry_id for d in buffer]
                with contextlib.suppress(TransportError):
                    await asyncio.shield(self._requeue_ids(queue, ids, False))
                for delivery in buffer:
                    delivery.settled = True
                    self._forget(delivery)

    async def _fill(self, reader: _Reader) -> None:
        """One turn of the consumer: move due retries, claim, or read (or wait for a slot)."""
        queue = reader.queue
        try:
            now = asyncio.get_running_loop().time()
            if now >= reader.next_move:
                await self._move_due(queue)
                reader.next_move = now + _TICK
            if reader.free > 0 and now >= reader.next_claim:
                reader.cursor = await self._claim(reader)
                if reader.cursor == "0-0":
                    reader.next_claim = now + self.claim_idle / 2
                if reader.buffer:
                    return
            if reader.free <= 0:
                reader.freed.clear()
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_TICK):
                        await reader.freed.wait()
                return
            reader.buffer.extend(await self._read(reader))
            reader.backoff = _BACKOFF_START
        except BrokerUnavailable as exc:
            log.warning("consuming %r: %s; retrying in %.1fs", queue, exc, reader.backoff)
            await asyncio.sleep(reader.backoff)
            reader.backoff = min(reader.backoff * 2, _BACKOFF_CAP)
        except TransportError as exc:
            # NOGROUP: the group is gone; UNBLOCKED: the stream was deleted under a read.
            if not any(sign in str(exc) for sign in ("NOGROUP", "UNBLOCKED")):
                raise
            log.warning("stream %r or its group vanished; declaring it again", queue)
            await self.declare(queue)

    async def _read(self, reader: _Reader) -> list[RedisDelivery]:
        async with self.translated(f"reading {reader.queue!r}"):
            response = await self.client.xreadgroup(
                self.group,
                self.consumer,
                {reader.queue: ">"},
                count=reader.free,
                block=round(_TICK * 1000),
            )
        return [
            self._hold(reader, RedisDelivery(self, reader.queue, entry_id, fields))
            for entry_id, fields in _entries(response)
        ]

    def _hold(self, reader: _Reader, delivery: RedisDelivery) -> RedisDelivery:
        delivery.reader = reader
        reader.unsettled.add(delivery.entry_id)
        self._held[(delivery.queue, delivery.entry_id)] = delivery
        return delivery

    def _forget(self, delivery: RedisDelivery) -> None:
        self._held.pop((delivery.queue, delivery.entry_id), None)
        reader = delivery.reader
        if reader is not None and delivery.entry_id in reader.unsettled:
            reader.unsettled.discard(delivery.entry_id)
            reader.freed.set()

    async def _claim(self, reader: _Reader) -> str:
        """Take over entries idle longer than claim_idle; dead-letter poison ones.
        Returns the XAUTOCLAIM cursor ("0-0": the pending list was scanned to the end)."""
        queue = reader.queue
        async with self.translated(f"claiming from {queue!r}"):
            answer = await self.client.xautoclaim(
                queue,
                self.group,
                self.consumer,
                max(1, round(self.claim_idle * 1000)),
                start_id=reader.cursor,
                count=reader.free,
            )
            claimed = [(_str(i), _as_fields(raw)) for i, raw in answer[1] if raw is not None]
            gone = [i for i, raw in answer[1] if raw is None and i is not None]
            if gone:  # Redis 6.2 claims entries deleted from the stream: let them go
                await self.client.xack(queue, self.group, *gone)
            fresh = [(i, f) for i, f in claimed if (queue, i) not in self._held]
            counts: list[Any] = []
            if fresh:
                async with self.client.pipeline(transaction=False) as pipe:
                    for entry_id, _ in fresh:
                        pipe.xpending_range(queue, self.group, entry_id, entry_id, 1)
                    counts = await pipe.execute()
        for (entry_id, fields), pending in zip(fresh, counts, strict=True):
            if not pending or _str(pending[0]["consumer"]) != self.consumer:
                continue  # taken by someone else in between
            count = int(pending[0]["times_delivered"])
            delivery = self._hold(reader, RedisDelivery(self, queue, entry_id, fields, count))
            if count > self.max_deliveries:
                await self._poison(delivery)
            else:
                log.warning(
                    "took over message %s of %r from a consumer that stopped (delivery %d)",
                    delivery.message_id or entry_id,
                    queue,
                    count,
                )
                reader.buffer.append(delivery)
        return _str(answer[0])

    async def _poison(self, delivery: RedisDelivery) -> None:
        error = (
            f"delivered {delivery.delivery_count} times without being settled "
            f"(REDIS_MAX_DELIVERIES={self.max_deliveries}): a worker died on it each time?"
        )
        log.error("message %s of %r: %s", delivery.message_id, delivery.queue, error)
        try:
            await delivery.dead_letter(error, reason=POISON)
        except TransportError as exc:
            log.error("could not dead-letter poison message %s: %s", delivery.entry_id, exc)
            delivery.settled = True
            self._forget(delivery)

    async def _move_due(self, queue: str) -> None:
        now = str(math.floor(time.time() * 1000))
        async with self.translated(f"moving due retries of {queue!r}"):
            while True:
                moved = await self._script("move", [delayed_name(queue), queue], [now, _MOVE_BATCH])
                if moved < _MOVE_BATCH:
                    return

    # -- settling --------------------------------------------------------------------------

    async def settle(
        self,
        delivery: RedisDelivery,
        mode: str,
        target: str | None = None,
        *,
        score: int = 0,
        payload: list[bytes] | None = None,
    ) -> None:
        """Run the settle script (ack, or copy to ``target`` then remove the original)."""
        refused = TransportError if mode == "ack" else PublishFailed
        try:
            async with self.translated(
                f"settling {delivery.entry_id} of {delivery.queue!r}", refused
            ):
                done = await self._script(
                    "settle",
                    [delivery.queue, target or delivery.queue],
                    [self.group, self.consumer, delivery.entry_id, mode, score, *(payload or [])],
                )
        finally:
            self._forget(delivery)
        if not done:
            log.warning(
                "message %s of %r was taken over by another consumer (idle over %.0fs?): "
                "left to it",
                delivery.message_id or delivery.entry_id,
                delivery.queue,
                self.claim_idle,
            )

    async def requeue(self, delivery: RedisDelivery) -> None:
        """Release: a copy at the tail of the queue, counting this delivery."""
        try:
            await self._requeue_ids(delivery.queue, [delivery.entry_id], delivery.handed_out)
        finally:
            self._forget(delivery)

    async def _requeue_ids(self, queue: str, ids: list[str], bump: bool) -> int:
        async with self.translated(f"releasing entries of {queue!r}"):
            moved = await self._script(
                "requeue", [queue], [self.group, self.consumer, "1" if bump else "0", *ids]
            )
        return int(moved)

    def _start_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew(), name="redis-streams-touch")

    async def _renew(self) -> None:
        """Keep held entries fresh so XAUTOCLAIM never takes them from a live consumer."""
        while True:
            await asyncio.sleep(self.claim_idle / 3)
            by_queue: dict[str, list[str]] = {}
            for queue, entry_id in list(self._held):
                by_queue.setdefault(queue, []).append(entry_id)
            for queue, ids in by_queue.items():
                try:
                    async with self.translated("touching held entries"):
                        kept = await self._script(
                            "touch", [queue], [self.group, self.consumer, *ids]
                        )
                except TransportError as exc:
                    log.warning("could not renew held entries of %r: %s", queue, exc)
                    continue
                for entry_id in set(ids) - {_str(entry_id) for entry_id in kept}:
                    # Taken over while we stalled (or gone): stop touching it; settling it
                    # will do nothing, since the scripts check ownership.
                    lost = self._held.pop((queue, entry_id), None)
                    if lost is not None:
                        log.warning(
                            "message %s of %r was taken over by another consumer",
                            lost.message_id or entry_id,
                            queue,
                        )

    # -- dead letters (chatprocessor dlq) --------------------------------------------------

    async def _dead_entries(
        self, queue: str, limit: int | None
    ) -> AsyncIterator[tuple[str, dict[bytes, bytes]]]:
        start, given = "-", 0
        while limit is None or given < limit:
            async with self.translated(f"reading {dead_letter_name(queue)!r}"):
                page = await self.client.xrange(dead_letter_name(queue), start, "+", count=100)
            if not page:
                return
            for entry_id, raw in page:
                yield _str(entry_id), _as_fields(raw)
                given += 1
                if limit is not None and given >= limit:
                    return
            start = "(" + _str(page[-1][0])

    async def list_dead_letters(self, queue: str, limit: int) -> list[DeadLetter]:
        letters = []
        async for entry_id, fields in self._dead_entries(queue, limit):
            delivery = RedisDelivery(None, queue, entry_id, fields)
            letters.append(
                DeadLetter(entry_id, delivery.body, delivery.message_id, delivery.headers)
            )
        return letters

    async def replay_dead_letters(
        self, queue: str, *, limit: int | None = None, message_id: str | None = None
    ) -> int:
        """Copy each back to its queue and delete it from the DLQ, in one transaction each."""
        chosen = []
        async for entry_id, fields in self._dead_entries(queue, None):
            entry = RedisDelivery(None, queue, entry_id, fields)
            if message_id is not None and entry.message_id != message_id:
                continue
            chosen.append(entry)
            if limit is not None and len(chosen) >= limit:
                break
        for entry in chosen:
            target = str(entry.headers.get(DLQ_QUEUE) or queue)
            async with (
                self.translated(f"replaying {entry.entry_id}", PublishFailed),
                self.client.pipeline(transaction=True) as pipe,
            ):
                pipe.xadd(target, entry.copy_fields(replay_headers(entry.headers)))
                pipe.xdel(dead_letter_name(queue), entry.entry_id)
                await pipe.execute()
        return len(chosen)

    async def purge_dead_letters(self, queue: str) -> int:
        async with (
            self.translated(f"purging {dead_letter_name(queue)!r}"),
            self.client.pipeline(transaction=True) as pipe,
        ):
            pipe.xlen(dead_letter_name(queue))
            pipe.delete(dead_letter_name(queue))
            count, _ = await pipe.execute()
        return int(count)

    # -- closing ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop renewing; every entry still ours goes back to the tail of its queue."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        if self._client is None:
            return
        for delivery in list(self._held.values()):
            with contextlib.suppress(TransportError):
                await delivery.release()
        for queue in sorted(self._queues):
            with contextlib.suppress(TransportError):
                await self._release_leftovers(queue)
        self._queues.clear()
        client, self._client = self._client, None
        with contextlib.suppress(*_CONNECTION_ERRORS, redis_errors.RedisError):
            await client.aclose()

    async def _release_leftovers(self, queue: str) -> None:
        """Entries XREADGROUP gave us that never arrived (a read cancelled mid-way) go back;
        then this consumer leaves the group, and so do crashed ones long idle with nothing
        pending."""
        async with self.translated(f"releasing leftovers of {queue!r}"):
            while True:
                pending = await self.client.xpending_range(
                    queue, self.group, "-", "+", 100, consumername=self.consumer
                )
                ids = [_str(p["message_id"]) for p in pending]
                if not ids or not await self._requeue_ids(queue, ids, False):
                    break
            for info in await self.client.xinfo_consumers(queue, self.group):
                name = _str(info["name"])
                idle_enough = name == self.consumer or int(info["idle"]) > _STALE_CONSUMER_MS
                if int(info["pending"]) == 0 and idle_enough:
                    await self.client.xgroup_delconsumer(queue, self.group, name)
