"""The live compose tests' shared engine (started on first use, gone at the end of the session) and their
stage timings in the terminal summary (CI logs keep them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.deploy.stack import LAST_RUN_TIMINGS, LiveEngine, Unavailable, start_live_engine


@pytest.fixture(scope="session")
def live_engine() -> Iterator[LiveEngine]:
    """One private dockerd for every live test module: the images are built once for all of them."""
    timings: dict[str, float] = {}
    try:
        live = start_live_engine(timings)
    except Unavailable as exc:
        pytest.skip(f"live compose test: {exc}")
    try:
        yield live
    finally:
        leftovers = live.close()
        LAST_RUN_TIMINGS.update(timings)
        assert not leftovers, f"the live compose tests left behind: {leftovers}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if LAST_RUN_TIMINGS:
        terminalreporter.write_sep("-", "live compose test stages (s)")
        terminalreporter.write_line(", ".join(f"{name}={value}" for name, value in LAST_RUN_TIMINGS.items()))
