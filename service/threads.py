"""Running model loads in threads that end with them, so the batcher's OpenMP team runs at full speed.

torch runs a CPU op on an OpenMP team owned by the calling thread, and the team lives as long as that
thread. Once the process holds more OpenMP threads than the machine has cores, libgomp cuts its
spin-waiting short for every team, and each of the forward pass's many parallel regions then pays a
sleep and a wake-up. Measured on 2 cores (efficientnet_lite0, one crop, batcher thread): 9.7 ms
when it owns the only team, 15.7 ms when a long-lived pool thread that once loaded (traced and
warmed up) the model keeps a second one. Loads therefore run in their own thread, whose team goes
away when it ends.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


def start_own_thread(fn: Callable[[], T], name: str) -> Future[T]:
    """Run `fn` in a new daemon thread that exits when it returns; a future of its result."""
    future: Future[T] = Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to whoever awaits the future
            future.set_exception(exc)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


async def run_in_own_thread(fn: Callable[[], T], name: str) -> T:
    """Await `fn` run in a thread of its own (see the module docstring); the event loop stays free."""
    return await asyncio.wrap_future(start_own_thread(fn, name))
