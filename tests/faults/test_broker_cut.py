"""The broker connection drops under load: a network cut (a TCP proxy between the worker
and RabbitMQ resets every connection), a broker restart (the proxy also refuses new
connections for a while) or the broker closing it (``rabbitmqctl close_connection``).
The worker reconnects, its consumer comes back, nothing is lost, and replies already
confirmed are not asked of the LLM again.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil

import httpx
import pytest

from chatprocessor.contracts.chat import ChatCodec
from chatprocessor.core.worker import Worker, WorkerConfig
from chatprocessor.providers.ollama import OllamaProvider
from chatprocessor.transports.rabbitmq import RabbitMQTransport
from tests.conftest import IN_CI
from tests.faults.helpers import (
    FAST_RETRY,
    Lab,
    TcpProxy,
    WorkerProcess,
    close_connection,
    connection_pids,
    make_jobs,
    wait_for,
    worker_connection_name,
)

pytestmark = [
    pytest.mark.faults,
    pytest.mark.rabbitmq,
    pytest.mark.timeout(90),
    pytest.mark.skipif(
        shutil.which("rabbitmqctl") is None and not IN_CI, reason="needs rabbitmqctl"
    ),
]

JOBS = 40


async def ready_status(worker: WorkerProcess) -> int:
    async with httpx.AsyncClient(timeout=5) as http:
        with contextlib.suppress(httpx.HTTPError):
            return (await http.get(worker.base + "/ready")).status_code
    return 0


@pytest.mark.parametrize("how", ["proxy-reset", "broker-down-2s", "rabbitmqctl-close"])
async def test_connection_cut_under_load(how: str, lab: Lab) -> None:
    fake, ledger = lab.fake, lab.ledger
    fake.latency = 0.5
    side = await lab.side("rabbitmq")
    async with TcpProxy() as proxy:
        port = 5672 if how == "rabbitmqctl-close" else proxy.port
        worker = await lab.worker(side, RABBITMQ_PORT=str(port), PREFETCH_COUNT="4").start()
        pids = await connection_pids(worker_connection_name(worker.pid))
        await side.publish_jobs(make_jobs(side.tag, JOBS))
        await wait_for(
            lambda: len(ledger.answered()) >= 8 and fake.in_flight >= 4,
            30,
            "answers flowing with jobs in flight",
            details=worker.console,
        )
        if how == "proxy-reset":
            assert proxy.cut() >= 1
        elif how == "broker-down-2s":
            await proxy.outage(2)
        else:
            assert len(pids) == 1, pids
            await close_connection(pids[0])
        assert len(ledger.answered()) < JOBS, "the cut came too late to be under load"

        async def consumer_back() -> bool:
            return await side.consumers() == 1

        await wait_for(
            ledger.all_answered,
            45,
            "every job answered after the reconnect",
            details=lambda: ledger.summary() + "\n" + worker.console(),
        )
        await wait_for(consumer_back, 10, "the worker consuming again")
        assert worker.running, worker.console()
        if how != "rabbitmqctl-close":
            assert proxy.accepted >= 2, "the worker never reconnected through the proxy"
        assert await ready_status(worker) == 200
        assert await worker.terminate() == 0, worker.console()
    report = await lab.report(side, f"broker connection cut ({how})")
    report.assert_ok()
    assert report.figures["answered"] == JOBS
    assert report.figures["dead_lettered"] == 0


@pytest.mark.timeout(60)
async def test_sigterm_while_the_broker_is_unreachable_exits_zero(lab: Lab) -> None:
    """The broker is gone with jobs in flight: SIGTERM still ends the process with 0 (the
    jobs are the broker's again), and a new worker answers them once it is back."""
    fake, ledger = lab.fake, lab.ledger
    fake.latency = 1.0
    side = await lab.side("rabbitmq")
    async with TcpProxy() as proxy:
        worker = await lab.worker(side, RABBITMQ_PORT=str(proxy.port), GRACEFUL_TIMEOUT="2").start()
        await side.publish_jobs(make_jobs(side.tag, 16))
        await wait_for(lambda: fake.in_flight >= 4, 20, "jobs in flight", details=worker.console)
        await proxy.close()  # cut, and refuse new connections

        async def noticed() -> bool:
            return await ready_status(worker) == 503

        await wait_for(noticed, 10, "/ready to report the broker gone", details=worker.console)
        code = await worker.terminate(timeout=20)
        assert code == 0, worker.console()
    fake.latency = 0.05
    second = await lab.worker(side).start()
    await wait_for(
        ledger.all_answered,
        30,
        "every job answered by the next worker",
        details=lambda: ledger.summary() + "\n" + second.console(),
    )
    assert await second.terminate() == 0
    report = await lab.report(side, "SIGTERM while the broker is unreachable")
    report.assert_ok()


@pytest.mark.timeout(60)
async def test_stop_as_the_connection_drops_still_drains(lab: Lab) -> None:
    """SIGTERM in the very instant the broker connection drops: the consumer's cleanup
    fails, and run() must still drain the jobs in flight and return (exit 0), not raise
    with them running while the provider is closed under them."""
    fake = lab.fake
    fake.latency = 1.0
    side = await lab.side("rabbitmq")
    async with TcpProxy() as proxy:
        worker = Worker(
            RabbitMQTransport(
                f"amqp://guest:guest@127.0.0.1:{proxy.port}/", retry_tiers=FAST_RETRY.tiers()
            ),
            OllamaProvider(fake.url, model="llama2", timeout=5, connect_timeout=1),
            ChatCodec(max_bytes=65536),
            WorkerConfig(
                input_queue=side.input,
                output_queue=side.output,
                prefetch=8,
                graceful_timeout=3,
                retry=FAST_RETRY,
            ),
        )
        await worker.start()
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            await side.publish_jobs(make_jobs(side.tag, 8))
            await wait_for(lambda: fake.in_flight >= 4, 20, "jobs in flight")
            await proxy.close()
            stop.set()  # SIGTERM in the same instant
            failure = None
            try:
                await asyncio.wait_for(running, 15)
            except Exception as exc:
                failure = exc
            left = len(worker._tasks)
        finally:
            for task in list(worker._tasks):
                task.cancel()
            await asyncio.gather(*worker._tasks, return_exceptions=True)
            await worker.transport.close()
            await worker.provider.close()
    assert failure is None, f"run() raised {failure!r} with {left} job(s) still running"
    assert left == 0
