"""Waiting for a `python -m service` child process to answer `/readyz`: shared by scripts and benchmarks."""

from __future__ import annotations

import subprocess
import time

import httpx


class ServiceNotReady(RuntimeError):
    """The child exited, or did not become ready in time; the message says which."""


def wait_until_ready(base_url: str, server: subprocess.Popen, timeout_s: float = 180.0, poll_s: float = 0.25) -> None:
    """Return once `GET {base_url}/readyz` answers 200; raise ServiceNotReady if `server` exits first or
    `timeout_s` passes. The caller owns the process (and stops it on failure as it sees fit)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            raise ServiceNotReady(f"the service exited with code {server.returncode} during start-up")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:  # not listening yet
            pass
        if time.monotonic() > deadline:
            raise ServiceNotReady(f"the service was not ready after {timeout_s:.0f} s")
        time.sleep(poll_s)
