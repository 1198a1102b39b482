"""Wake-ups between the processes that share a local queue file.

A consumer waiting for a queue listens on a UNIX datagram socket in Linux's
abstract namespace (no file to clean up, no path-length limit) and registers its
address in the queue file; a publisher rings every listener of the queue once its
row is committed. A ring is only a hint: a lost one costs the polling interval,
which stays as the fallback (and is all there is where abstract sockets do not exist).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import Iterable

#: Nobody may own these addresses but this library's listeners.
ADDRESS_PREFIX = "\0chatprocessor.bell."


class Bell:
    """One listening socket; ``wait`` returns when it rang (or after ``timeout``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.address = f"{ADDRESS_PREFIX}{uuid.uuid4().hex}"
        self._loop = loop
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.bind(self.address)
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise
        self._rang = asyncio.Event()
        loop.add_reader(self._sock.fileno(), self._on_ring)

    @classmethod
    def open(cls) -> Bell | None:
        """A bell, or None where abstract UNIX sockets are not available (polling only)."""
        if not hasattr(socket, "AF_UNIX"):
            return None
        try:
            return cls(asyncio.get_running_loop())
        except (OSError, NotImplementedError):  # not Linux, or a loop without add_reader
            return None

    def _on_ring(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._sock.recv(64):
                pass
        self._rang.set()

    async def wait(self, timeout: float) -> bool:
        """True when it rang, False after ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                await self._rang.wait()
        except TimeoutError:
            return False
        self._rang.clear()
        return True

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


class Ringer:
    """Sends the rings; one unbound socket for the life of the transport."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None

    def ring(self, addresses: Iterable[str]) -> list[str]:
        """One byte to each address; returns those nobody listens on any more."""
        gone: list[str] = []
        for address in addresses:
            if not address.startswith(ADDRESS_PREFIX):
                continue  # only our own listeners' addresses are ever rung
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.setblocking(False)
                self._sock.sendto(b"\1", address)
            except (ConnectionRefusedError, FileNotFoundError):
                gone.append(address)  # its process ended without unregistering
            except OSError:
                pass  # a full buffer means rings are waiting already; anything else: polling
        return gone

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
