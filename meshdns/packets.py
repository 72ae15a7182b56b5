"""The UDP packet path: compiled (``meshdns/_udpbatch.c``) when it was built, else pure Python.

The compiled path reads datagrams in batches (one ``recvmmsg`` for up to BATCH of them),
answers the cache hits in C and sends the replies of a batch together with one ``sendmmsg`` (no
reply waits more than 0.2 ms for Python to make the others). The event loop calls the reader's
``readable`` itself, so a wakeup whose datagrams are all answered in C runs no Python at all.
Whatever is not a plain hit (nor the commonest misses, a one-instance ``<name>.service`` A/AAAA
and the NXDOMAIN of a service that does not exist with nowhere else to look, which it answers as
``fastpath.PlainPath`` does) is handed to the same Python code the pure path runs
(``UdpProtocol.reply``), one datagram at a time and in arrival order, so the replies are byte
for byte the same (tests/test_packet_path.py, tests/test_fastpath.py). An exception from that
code loses only its own reply (logged); the rest of the batch is answered. The pure path is
asyncio's datagram transport and ``UdpProtocol.datagram_received``. ``MESHDNS_PURE_PYTHON=1``
chooses the pure path even where the extension is built; ``pip install`` builds it where gcc
and the Python headers are.

A full socket send buffer (EAGAIN) loses nothing: the replies wait, no datagram is read until
they are out (the kernel's receive buffer holds the queries meanwhile), and reading resumes once
the socket is writable. A reply the kernel refuses for itself (EMSGSIZE, an unreachable
address) is dropped, as the pure path's ``error_received`` ignores it, and counted
(``send_errors``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from types import ModuleType
from typing import Any

from .cache import Cached

log = logging.getLogger("meshdns")

PURE_ENV = "MESHDNS_PURE_PYTHON"  # "1": the pure-Python packet path even with the extension
BATCH = 64  # datagrams per recvmmsg: past ~32 the per-batch costs no longer show


def compiled_module() -> tuple[ModuleType | None, str]:
    """The extension (None when not to be used) and why this path: for the start-up log."""
    if os.environ.get(PURE_ENV, "") == "1":
        return None, f"pure Python ({PURE_ENV}=1)"
    try:
        from . import _udpbatch
    except ImportError as exc:
        return None, f"pure Python (the compiled extension is not built: {exc})"
    return _udpbatch, (
        "compiled (meshdns._udpbatch: recvmmsg/sendmmsg, cache hits and the one-instance and"
        " NXDOMAIN plain misses in C)"
    )


class CompiledUdp:
    """One UDP socket served by the compiled path. It stands in for the asyncio transport
    where Python sends a reply made later (``sendto``, ``is_closing``: a forward's, an
    Execute's)."""

    def __init__(self, module: ModuleType, sock: socket.socket, entries: dict[bytes, Cached],
                 answer: Callable[[bytes, tuple, bytes | None], bytes | None],
                 observe: Callable[[float], None], rebuild_after: int,
                 sample_every: int, responder: Any = None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.reader: Any = module.Reader(self.fd, entries, Cached, rebuild_after,
                                         sample_every, BATCH)
        # the event loop calls the reader itself (no Python frame per wakeup); it calls
        # answer(data, address, cache key of a miss or None) for what it leaves to Python
        self.reader.callbacks(answer, observe, self._failed, self._wait_for_room)
        if responder is not None:  # the one-instance plain miss in C too (see _udpbatch.c)
            self.reader.plain(responder)
        self.loop = asyncio.get_running_loop()
        self.closing = False
        self.waiting = False  # for room in the send buffer: not reading meanwhile
        self.loop.add_reader(self.fd, self.reader.readable)

    @staticmethod
    def _failed(exc: BaseException, reading: bool) -> None:
        if reading:  # (errors queued on the socket are ignored in C already)
            log.debug("UDP read failed: %s", exc)
        else:  # never die on a packet (and never leave a batch half done)
            log.error("internal error answering a UDP query", exc_info=exc)

    def sendto(self, reply: bytes, addr: tuple) -> None:
        """Send a reply made later (queued while the send buffer is full)."""
        if not self.reader.send(reply, addr):
            log.debug("UDP reply to %s dropped: the send buffer stays full", addr[0])
        if self.reader.blocked:
            self._wait_for_room()

    def is_closing(self) -> bool:
        return self.closing

    def _wait_for_room(self) -> None:
        if not self.waiting and not self.closing:
            self.waiting = True
            self.loop.remove_reader(self.fd)
            self.loop.add_writer(self.fd, self._writable)

    def _writable(self) -> None:
        if self.reader.flush():
            self.waiting = False
            self.loop.remove_writer(self.fd)
            self.loop.add_reader(self.fd, self.reader.readable)

    def close(self) -> None:
        """Stop reading, send what is queued if there is room, close the socket."""
        if self.closing:
            return
        self.closing = True
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        self.reader.flush()
        self.reader.close()
        self.sock.close()


__all__ = ["BATCH", "PURE_ENV", "CompiledUdp", "compiled_module"]
