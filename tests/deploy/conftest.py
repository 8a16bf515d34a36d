"""Show the live compose test's stage timings in the terminal summary (CI logs keep them)."""

from __future__ import annotations

import pytest

from tests.deploy.stack import LAST_RUN_TIMINGS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if LAST_RUN_TIMINGS:
        terminalreporter.write_sep("-", "live compose test stages (s)")
        terminalreporter.write_line(", ".join(f"{name}={value}" for name, value in LAST_RUN_TIMINGS.items()))
