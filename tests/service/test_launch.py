import socket
import subprocess
import sys

import pytest

from service.launch import ServiceNotReady, wait_until_ready


def _closed_port_url() -> str:
    with socket.socket() as probe:  # bound then released: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_a_child_that_exits_is_reported_with_its_code() -> None:
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    child.wait()
    with pytest.raises(ServiceNotReady, match="exited with code 3"):
        wait_until_ready(_closed_port_url(), child, timeout_s=5.0)


def test_a_child_that_never_answers_times_out() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(ServiceNotReady, match="not ready after"):
            wait_until_ready(_closed_port_url(), child, timeout_s=0.3, poll_s=0.05)
    finally:
        child.kill()
        child.wait()
