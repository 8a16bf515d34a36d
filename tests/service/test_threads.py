"""Loads run in a thread of their own that ends with them (so its OpenMP team goes away)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.threads import run_in_own_thread


def _alive(name: str) -> bool:
    return any(thread.name == name for thread in threading.enumerate())


def test_result_and_exception_come_back_and_the_thread_ends() -> None:
    seen: list[threading.Thread] = []

    def work() -> int:
        seen.append(threading.current_thread())
        return 42

    def fail() -> None:
        raise KeyError("broken")

    async def main() -> int:
        value = await run_in_own_thread(work, "stl-test-work")
        with pytest.raises(KeyError, match="broken"):
            await run_in_own_thread(fail, "stl-test-fail")
        return value

    assert asyncio.run(main()) == 42
    assert seen[0] is not threading.main_thread() and seen[0].name == "stl-test-work"
    seen[0].join(5)
    assert not seen[0].is_alive() and not _alive("stl-test-fail")
