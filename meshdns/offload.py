"""Long Python work off the event loop (catalog loads, freeing old snapshots).

Two things the packet path needs from such work: it must not hold the GIL for long stretches
(``gil_handed_back``), and it must never keep the process alive once asked to stop. The work
runs in a daemon thread (``in_thread``), not in asyncio's default executor, whose threads the
interpreter joins at exit: a reload stuck reading a huge file would hold SIGTERM for as long as
it takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

_gil_lock = threading.Lock()
_gil_users = 0
_gil_interval = 0.005


@contextmanager
def gil_handed_back(interval: float = 0.0005) -> Iterator[None]:
    """While a worker thread does long Python work (a reload, freeing a snapshot), make the
    interpreter switch threads every ``interval`` so the event loop waits at most that long
    for the GIL. Counted, so overlapping users restore the original setting only once."""
    global _gil_users, _gil_interval
    with _gil_lock:
        if _gil_users == 0:
            _gil_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_gil_interval, interval))
        _gil_users += 1
    try:
        yield
    finally:
        with _gil_lock:
            _gil_users -= 1
            if _gil_users == 0:
                sys.setswitchinterval(_gil_interval)


def in_thread(work: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Run ``work`` in a new daemon thread, GIL handed back; a future for its result.

    The future may be abandoned (a parse-time bound, shutdown): the thread then finishes on its
    own and its result is dropped."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            with gil_handed_back():
                result = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side
            error: BaseException | None = exc
            result = None
        else:
            error = None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


__all__ = ["gil_handed_back", "in_thread"]
