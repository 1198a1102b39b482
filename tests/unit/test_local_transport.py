"""LocalTransport: the SQLite queue file, seen through two instances, two processes and a clock."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from chatprocessor.core.errors import PublishFailed
from chatprocessor.transports import doorbell, local
from chatprocessor.transports.base import Delivery, Outgoing
from chatprocessor.transports.local import LocalTransport

pytestmark = pytest.mark.timeout(60)

QUEUE = "jobs"
Factory = Callable[..., Awaitable[LocalTransport]]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "queue.sqlite3"


@pytest.fixture
async def open_transport(db_path: Path) -> AsyncIterator[Factory]:
    """Connected LocalTransports on the same file; all closed after the test."""
    opened: list[LocalTransport] = []

    async def factory(*, visibility_timeout: float = 30.0) -> LocalTransport:
        transport = LocalTransport(db_path, visibility_timeout=visibility_timeout)
        await transport.connect()
        opened.append(transport)
        return transport

    yield factory
    for transport in opened:
        with contextlib.suppress(Exception):
            await transport.close()


async def take(
    transport: LocalTransport,
    queue: str = QUEUE,
    n: int = 1,
    *,
    prefetch: int = 100,
    timeout: float = 5.0,
) -> list[Delivery]:
    """The next ``n`` deliveries of ``queue`` (unsettled); TimeoutError if they do not come."""
    got: list[Delivery] = []

    async def collect() -> None:
        async with contextlib.aclosing(transport.consume(queue, prefetch)) as stream:
            async for delivery in stream:
                got.append(delivery)
                if len(got) >= n:
                    return

    await asyncio.wait_for(collect(), timeout)
    return got


async def nothing_for(transport: LocalTransport, seconds: float, queue: str = QUEUE) -> None:
    """Assert ``transport`` is handed nothing from ``queue`` for ``seconds``."""
    try:
        got = await take(transport, queue, timeout=seconds)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected delivery: {got[0].message_id} {got[0].body!r}")


async def publish(
    transport: LocalTransport, body: bytes, queue: str = QUEUE, **props: object
) -> None:
    await transport.publish(queue, Outgoing(body, **props))  # type: ignore[arg-type]


async def kill_renewer(transport: LocalTransport) -> None:
    """Make ``transport`` behave like a dead process: nobody renews its leases any more."""
    renewer = transport._renewer
    assert renewer is not None
    renewer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await renewer
    transport._renewer = None


# -- basics ---------------------------------------------------------------------------------------


async def test_publish_then_consume_keeps_every_property(open_transport: Factory) -> None:
    transport = await open_transport()
    headers = {"x-trace": "abc", "attempt": 3, "nested": {"a": [1, 2]}}
    await transport.publish(
        QUEUE,
        Outgoing(
            b'{"conversation_id": 1}',
            message_id="m-1",
            correlation_id="c-1",
            reply_to="somewhere",
            type="UserPromptReceived",
            headers=headers,
        ),
    )
    [delivery] = await take(transport)
    assert delivery.body == b'{"conversation_id": 1}'
    assert isinstance(delivery.body, bytes)
    assert delivery.message_id == "m-1"
    assert delivery.correlation_id == "c-1"
    assert delivery.reply_to == "somewhere"
    assert delivery.type == "UserPromptReceived"
    assert delivery.headers == headers
    assert delivery.redelivered is False
    await delivery.ack()


async def test_missing_properties_come_back_as_none(open_transport: Factory) -> None:
    transport = await open_transport()
    await publish(transport, b"plain")
    [delivery] = await take(transport)
    assert delivery.body == b"plain"
    assert delivery.message_id is None
    assert delivery.correlation_id is None
    assert delivery.reply_to is None
    assert delivery.type is None
    assert delivery.headers == {}
    await delivery.ack()


async def test_queues_are_separate(open_transport: Factory) -> None:
    transport = await open_transport()
    await publish(transport, b"for-a", queue="a")
    await publish(transport, b"for-b", queue="b")
    [b] = await take(transport, "b")
    assert b.body == b"for-b"
    [a] = await take(transport, "a")
    assert a.body == b"for-a"
    await a.ack()
    await b.ack()


async def test_ack_removes_the_message_for_everyone(open_transport: Factory) -> None:
    first = await open_transport(visibility_timeout=0.3)
    await publish(first, b"once", message_id="m-ack")
    [delivery] = await take(first)
    await delivery.ack()
    assert await first.depth(QUEUE) == 0
    second = await open_transport(visibility_timeout=0.3)
    assert await second.depth(QUEUE) == 0
    await nothing_for(second, 0.8)  # well past the visibility timeout
    await nothing_for(first, 0.2)


async def test_settling_twice_is_harmless(open_transport: Factory) -> None:
    transport = await open_transport()
    await publish(transport, b"one")
    await publish(transport, b"two")
    [delivery] = await take(transport)
    await delivery.ack()
    await delivery.ack()
    await delivery.release()  # already settled: must not resurrect it
    await delivery.dead_letter("late")
    [other] = await take(transport)
    assert other.body == b"two"
    await other.ack()
    assert await transport.list_dead_letters(QUEUE, 10) == []
    assert await transport.depth(QUEUE) == 0


async def test_fifo_order(open_transport: Factory) -> None:
    transport = await open_transport()
    for i in range(25):
        await publish(transport, f"{i}".encode(), message_id=f"m-{i}")
    deliveries = await take(transport, n=25, prefetch=25)
    assert [d.body for d in deliveries] == [f"{i}".encode() for i in range(25)]
    for delivery in deliveries:
        await delivery.ack()


async def test_fifo_order_one_at_a_time(open_transport: Factory) -> None:
    transport = await open_transport()
    for i in range(5):
        await publish(transport, f"{i}".encode())
    seen = []
    for _ in range(5):
        [delivery] = await take(transport, prefetch=1)
        seen.append(delivery.body)
        await delivery.ack()
    assert seen == [b"0", b"1", b"2", b"3", b"4"]


async def test_prefetch_limits_unsettled_deliveries(open_transport: Factory) -> None:
    transport = await open_transport()
    for i in range(5):
        await publish(transport, f"{i}".encode())
    got: list[Delivery] = []

    async def consume() -> None:
        async for delivery in transport.consume(QUEUE, prefetch=2):
            got.append(delivery)

    consumer = asyncio.create_task(consume())
    try:
        async with asyncio.timeout(5):
            while len(got) < 2:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        assert len(got) == 2, "a third delivery was handed out with two unsettled"

        await got[0].ack()
        async with asyncio.timeout(5):
            while len(got) < 3:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        assert len(got) == 3

        await got[1].release()  # release frees a slot too (and the message comes back)
        async with asyncio.timeout(5):
            while len(got) < 4:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        assert len(got) == 4
        assert got[3].body == b"1" and got[3].redelivered

        await got[2].dead_letter("bad")  # and so does dead_letter
        async with asyncio.timeout(5):
            while len(got) < 5:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        assert len(got) == 5
        assert [d.body for d in got] == [b"0", b"1", b"2", b"1", b"3"]
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer


# -- release and dead-letter ----------------------------------------------------------------------


async def test_release_makes_it_available_again_at_once(open_transport: Factory) -> None:
    transport = await open_transport(visibility_timeout=30)
    await publish(transport, b"again", message_id="m-rel")
    await publish(transport, b"later", message_id="m-later")
    [delivery] = await take(transport)
    assert not delivery.redelivered
    await delivery.release()
    started = time.monotonic()
    [again] = await take(transport, timeout=2)
    assert time.monotonic() - started < 1.0  # not after the 30 s visibility timeout
    assert again.message_id == "m-rel"  # back at its place, ahead of newer messages
    assert again.body == b"again"
    assert again.redelivered is True
    await again.ack()


async def test_released_message_goes_to_another_instance(open_transport: Factory) -> None:
    first = await open_transport()
    second = await open_transport()
    await publish(first, b"x", message_id="m-x")
    [delivery] = await take(first)
    await nothing_for(second, 0.2)
    await delivery.release()
    [again] = await take(second, timeout=2)
    assert again.message_id == "m-x" and again.redelivered
    await again.ack()


async def test_dead_letter_keeps_it_aside_with_the_reason(open_transport: Factory) -> None:
    transport = await open_transport(visibility_timeout=0.3)
    await publish(transport, b"{broken", message_id="m-dead")
    await publish(transport, b"fine", message_id="m-fine")
    [delivery] = await take(transport)
    await delivery.dead_letter("body is not valid JSON")
    dead = await transport.list_dead_letters(QUEUE, 10)
    assert len(dead) == 1
    assert dead[0].error == "body is not valid JSON"
    assert dead[0].reason == "rejected"
    assert dead[0].body == b"{broken"
    assert dead[0].message_id == "m-dead"
    assert dead[0].attempts == 0  # rejected before any attempt
    assert await transport.list_dead_letters("other", 10) == []

    [fine] = await take(transport)
    assert fine.message_id == "m-fine"
    await fine.ack()
    other = await open_transport(visibility_timeout=0.3)
    await nothing_for(other, 0.8)  # never delivered again, not even after the timeout
    assert await other.depth(QUEUE) == 0
    assert len(await other.list_dead_letters(QUEUE, 10)) == 1


# -- visibility timeout and leases ----------------------------------------------------------------


async def test_claim_of_a_dead_consumer_comes_back_after_the_timeout(
    open_transport: Factory,
) -> None:
    dead = await open_transport(visibility_timeout=0.3)
    await publish(dead, b"orphan", message_id="m-orphan")
    before_claim = time.time()
    [claimed] = await take(dead)
    assert not claimed.redelivered
    await kill_renewer(dead)  # the process "dies": no renewal, no settle, no close

    survivor = await open_transport(visibility_timeout=0.3)
    [again] = await take(survivor, timeout=5)
    waited = time.time() - before_claim
    assert 0.29 <= waited < 3, waited  # not before the lease ran out, not much after
    assert again.message_id == "m-orphan"
    assert again.body == b"orphan"
    assert again.redelivered is True
    await again.ack()
    assert await survivor.depth(QUEUE) == 0


async def test_live_consumer_keeps_its_claim_by_renewing(open_transport: Factory) -> None:
    holder = await open_transport(visibility_timeout=0.3)
    await publish(holder, b"busy", message_id="m-busy")
    [claimed] = await take(holder)
    other = await open_transport(visibility_timeout=0.3)
    await nothing_for(other, 1.0)  # held for > 3 visibility timeouts, renewer running
    await claimed.ack()
    await nothing_for(other, 0.5)
    assert await other.depth(QUEUE) == 0


async def test_stale_ack_does_not_delete_the_new_owners_claim(open_transport: Factory) -> None:
    slow = await open_transport(visibility_timeout=0.3)
    await publish(slow, b"contested", message_id="m-c")
    [stale] = await take(slow)
    await kill_renewer(slow)

    fast = await open_transport(visibility_timeout=30)
    [fresh] = await take(fast, timeout=5)
    assert fresh.message_id == "m-c" and fresh.redelivered

    await stale.ack()  # the lease moved on: this must not touch fast's claim
    assert await fast.depth(QUEUE) == 1
    await stale.release()
    await stale.dead_letter("too late")
    assert await fast.list_dead_letters(QUEUE, 10) == []
    third = await open_transport(visibility_timeout=30)
    await nothing_for(third, 0.3)  # still claimed by fast, not made visible by the stale release

    await fresh.ack()
    assert await fast.depth(QUEUE) == 0


async def test_stale_dead_letter_does_not_steal_the_message(open_transport: Factory) -> None:
    slow = await open_transport(visibility_timeout=0.3)
    await publish(slow, b"contested", message_id="m-d")
    [stale] = await take(slow)
    await kill_renewer(slow)
    fast = await open_transport(visibility_timeout=30)
    [fresh] = await take(fast, timeout=5)
    await stale.dead_letter("stale reason")
    assert await fast.list_dead_letters(QUEUE, 10) == []
    assert await fast.depth(QUEUE) == 1
    await fresh.ack()
    assert await fast.depth(QUEUE) == 0


async def test_close_gives_unsettled_deliveries_back(
    open_transport: Factory, db_path: Path
) -> None:
    first = LocalTransport(db_path, visibility_timeout=30)
    await first.connect()
    await publish(first, b"held", message_id="m-held")
    [_held] = await take(first)
    await first.close()
    second = await open_transport(visibility_timeout=30)
    [again] = await take(second, timeout=2)
    assert again.message_id == "m-held" and again.redelivered
    await again.ack()


# -- reply queues ---------------------------------------------------------------------------------


async def test_reply_queue_receives_what_is_published_to_it(open_transport: Factory) -> None:
    requester = await open_transport()
    worker = await open_transport()
    reply_queue = await requester.open_reply_queue()
    assert reply_queue.name.startswith("reply.")
    try:
        await worker.publish(
            reply_queue.name, Outgoing(b'{"answer": 42}', correlation_id="c-9", type="Bot")
        )

        async def first() -> Delivery:
            async for delivery in reply_queue.messages():
                return delivery
            raise AssertionError("reply queue ended")

        reply = await asyncio.wait_for(first(), 5)
        assert reply.body == b'{"answer": 42}'
        assert reply.correlation_id == "c-9"
        assert reply.type == "Bot"
        assert await requester.depth(reply_queue.name) == 0  # messages() settles them
    finally:
        await reply_queue.close()


async def test_reply_queues_are_private(open_transport: Factory) -> None:
    transport = await open_transport()
    one = await transport.open_reply_queue()
    two = await transport.open_reply_queue()
    try:
        assert one.name != two.name
        await transport.publish(two.name, Outgoing(b"for-two"))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(aiter(one.messages())), 0.3)
    finally:
        await one.close()
        await two.close()


async def test_publish_to_unknown_reply_queue_fails(open_transport: Factory) -> None:
    transport = await open_transport()
    with pytest.raises(PublishFailed):
        await transport.publish("reply.never-opened", Outgoing(b"lost"))
    assert await transport.depth("reply.never-opened") == 0


async def test_publish_to_closed_reply_queue_fails(open_transport: Factory) -> None:
    requester = await open_transport()
    worker = await open_transport()
    reply_queue = await requester.open_reply_queue()
    await worker.publish(reply_queue.name, Outgoing(b"left over"))
    await reply_queue.close()
    assert await worker.depth(reply_queue.name) == 0  # leftovers dropped with the queue
    with pytest.raises(PublishFailed):
        await worker.publish(reply_queue.name, Outgoing(b"too late"))


# -- two processes --------------------------------------------------------------------------------

PUBLISHER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from chatprocessor.transports.base import Outgoing
    from chatprocessor.transports.local import LocalTransport

    async def main() -> None:
        transport = LocalTransport(Path(sys.argv[1]))
        await transport.connect()
        for i in range(int(sys.argv[3])):
            await transport.publish(sys.argv[2], Outgoing(b"%d" % i, message_id=f"p-{i}"))
            await asyncio.sleep(0.01)
        await transport.close()

    asyncio.run(main())
    """
)

CONSUMER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from chatprocessor.transports.local import LocalTransport

    async def main() -> None:
        transport = LocalTransport(Path(sys.argv[1]))
        await transport.connect()
        deadline = asyncio.get_running_loop().time() + float(sys.argv[3])

        async def run() -> None:
            async for delivery in transport.consume(sys.argv[2], prefetch=1):
                print(delivery.message_id, flush=True)
                await delivery.ack()

        try:
            await asyncio.wait_for(run(), deadline - asyncio.get_running_loop().time())
        except TimeoutError:
            pass
        await transport.close()

    asyncio.run(main())
    """
)


async def _run_python(script: str, *args: str, timeout: float = 30) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_another_process_publishes_while_we_consume(
    open_transport: Factory, db_path: Path
) -> None:
    transport = await open_transport()
    await transport.ping()  # schema exists before the other process opens the file
    received: list[Delivery] = []

    async def consume_all() -> None:
        async for delivery in transport.consume(QUEUE, prefetch=1):
            received.append(delivery)
            await delivery.ack()
            if len(received) == 20:
                return

    consumer = asyncio.create_task(asyncio.wait_for(consume_all(), 40))
    code, _, err = await _run_python(PUBLISHER, str(db_path), QUEUE, "20")
    assert code == 0, err
    await consumer
    assert [d.message_id for d in received] == [f"p-{i}" for i in range(20)]
    assert [d.body for d in received] == [str(i).encode() for i in range(20)]
    assert await transport.depth(QUEUE) == 0


async def test_two_processes_share_the_work_without_duplicates(
    open_transport: Factory, db_path: Path
) -> None:
    transport = await open_transport()
    for i in range(60):
        await publish(transport, b"job", message_id=f"j-{i}")
    mine: list[str] = []

    async def consume_some() -> None:
        async for delivery in transport.consume(QUEUE, prefetch=1):
            mine.append(str(delivery.message_id))
            await asyncio.sleep(0.005)
            await delivery.ack()

    consumer = asyncio.create_task(consume_some())
    try:
        code, out, err = await _run_python(CONSUMER, str(db_path), QUEUE, "3")
    finally:
        async with asyncio.timeout(10):
            while await transport.depth(QUEUE) > 0:
                await asyncio.sleep(0.05)
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
    assert code == 0, err
    theirs = out.split()
    assert theirs, "the other process got no work at all"
    assert sorted(mine + theirs) == sorted(f"j-{i}" for i in range(60))
    assert not set(mine) & set(theirs)


# -- a claim caught by cancellation ---------------------------------------------------------------


async def test_claim_interrupted_by_cancellation_is_not_lost(
    open_transport: Factory, db_path: Path
) -> None:
    worker = await open_transport(visibility_timeout=30)
    await publish(worker, b"unlucky", message_id="m-unlucky")

    # Another process holds the write lock, so the claim waits inside the SQLite thread.
    blocker = sqlite3.connect(db_path, timeout=5, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    consumer = asyncio.create_task(take(worker, timeout=10))
    await asyncio.sleep(0.3)  # the claim's UPDATE is now waiting for the lock
    consumer.cancel()  # shutdown arrives
    with contextlib.suppress(asyncio.CancelledError):
        await consumer
    blocker.execute("COMMIT")  # the claim goes through, for nobody
    blocker.close()
    await asyncio.sleep(0.3)
    await worker.close()

    successor = await open_transport(visibility_timeout=30)
    assert await successor.depth(QUEUE) == 1  # not lost: claimed by nobody, invisible
    [again] = await take(successor, timeout=3)
    assert again.message_id == "m-unlucky"
    await again.ack()


async def test_a_failing_write_is_rolled_back_whole(tmp_path: Path) -> None:
    """_run(commit=True) is one transaction: a statement that ran before an error is undone."""
    transport = LocalTransport(tmp_path / "q.sqlite3")
    await transport.connect()
    try:

        def insert_then_fail(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO messages (queue, body, visible_at, created_at)"
                " VALUES ('q', x'00', 0, 0)"
            )
            raise RuntimeError("half-way")

        with pytest.raises(RuntimeError):
            await transport._run(insert_then_fail, commit=True)
        assert await transport.depth("q") == 0
    finally:
        await transport.close()


# -- wake-ups (doorbell.py) ---------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="abstract UNIX sockets are Linux's")
async def test_a_publish_from_another_process_wakes_the_consumer_at_once(
    open_transport: Factory, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the fallback look pushed to 60 s, only the publisher's ring can deliver in time."""
    monkeypatch.setattr(local, "_BELL_POLL", 60.0)
    transport = await open_transport()
    await transport.ping()
    consumer = asyncio.create_task(take(transport, n=3, timeout=20))
    await asyncio.sleep(0.3)  # idle: registered and waiting for its bell
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM listeners WHERE queue = ?", (QUEUE,)).fetchone()[0]
    code, _, err = await _run_python(PUBLISHER, str(db_path), QUEUE, "3")
    assert code == 0, err
    assert [d.message_id for d in await consumer] == ["p-0", "p-1", "p-2"]


async def test_a_listener_whose_process_died_is_forgotten(
    open_transport: Factory, db_path: Path
) -> None:
    transport = await open_transport()
    dead = f"{doorbell.ADDRESS_PREFIX}{'0' * 32}"  # registered, nobody listens
    with sqlite3.connect(db_path) as db:
        db.execute("INSERT INTO listeners (address, queue) VALUES (?, ?)", (dead, QUEUE))
    await transport.publish(QUEUE, Outgoing(b"1"))  # rings it, finds it gone
    await transport.publish(QUEUE, Outgoing(b"2"))  # forgets it
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT address FROM listeners").fetchall() == []
    assert [d.body for d in await take(transport, n=2)] == [b"1", b"2"]


async def test_without_a_bell_consumers_poll(
    open_transport: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where abstract sockets do not exist, polling alone delivers."""
    monkeypatch.setattr(local.Bell, "open", classmethod(lambda cls: None))
    consumer_side, publisher_side = await open_transport(), await open_transport()
    consumer = asyncio.create_task(take(consumer_side, n=2))
    await asyncio.sleep(0.1)
    await publisher_side.publish(QUEUE, Outgoing(b"a"))
    await publisher_side.publish(QUEUE, Outgoing(b"b"))
    assert [d.body for d in await consumer] == [b"a", b"b"]


async def test_closing_unregisters_the_bells(open_transport: Factory, db_path: Path) -> None:
    transport = await open_transport()
    with contextlib.suppress(TimeoutError):
        await take(transport, timeout=0.3)  # waits, so it registers
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM listeners").fetchone()[0] == (
            1 if sys.platform == "linux" else 0
        )
    await transport.close()
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM listeners").fetchone()[0] == 0
