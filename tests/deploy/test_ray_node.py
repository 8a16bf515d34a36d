"""docker/ray_node.py (the image's stl-ray-node): the `ray start` lines of each role, and the driver's life cycle
with a stand-in for `ray` (no Ray starts here)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.deploy.stack import load_ray_node


@pytest.fixture
def ray_node(monkeypatch: pytest.MonkeyPatch):
    module = load_ray_node()
    monkeypatch.setattr(module, "ray_cli", lambda: "ray")
    for name in ("STL_RAY_ADDRESS", "STL_RAY_NODE_IP", "STL_RAY_OBJECT_STORE_BYTES"):
        monkeypatch.delenv(name, raising=False)
    return module


def start_line(ray_node, *argv: str) -> list[str]:
    return ray_node.start_command(ray_node.get_args_parser().parse_args(list(argv)))


def test_head_runs_the_gcs_without_cpus_client_server_or_usage_stats(ray_node) -> None:
    line = start_line(ray_node, "head", "--port", "6390", "--port-base", "23000", "--cpus", "0")
    assert line[:3] == ["ray", "start", "--block"]
    assert {"--head", "--port=6390", "--num-cpus=0", "--include-dashboard=false", "--disable-usage-stats",
            "--dashboard-port=23007", "--node-manager-port=23001", "--min-worker-port=23100",
            "--max-worker-port=23199"} <= set(line)
    # The Ray Client server needs ray[client], which the image does not have: `ray start` refuses the flag.
    assert not [arg for arg in line if arg.startswith(("--ray-client-server-port", "--address"))]


def test_worker_joins_the_address_with_its_own_port_block(ray_node) -> None:
    line = start_line(ray_node, "worker", "--address", "ray-head:6379", "--port-base", "24000", "--cpus", "2",
                      "--object-store-bytes", "1000000", "--node-ip", "10.1.2.3")
    assert {"--address=ray-head:6379", "--num-cpus=2", "--object-manager-port=24002", "--metrics-export-port=24006",
            "--object-store-memory=1000000", "--node-ip-address=10.1.2.3"} <= set(line)
    assert "--head" not in line and not [arg for arg in line if arg.startswith("--dashboard-port")]


def test_driver_node_offers_no_cpus_or_gpus_whatever_it_is_told(ray_node) -> None:
    line = start_line(ray_node, "driver", "--address", "h:1", "--port-base", "26000", "--cpus", "8")
    assert "--num-cpus=0" in line and "--num-gpus=0" in line and "--num-cpus=8" not in line


def test_settings_come_from_the_environment(ray_node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STL_RAY_ADDRESS", "10.0.0.1:7000")
    monkeypatch.setenv("STL_RAY_OBJECT_STORE_BYTES", "123456789")
    line = start_line(ray_node, "worker")
    assert "--address=10.0.0.1:7000" in line and "--object-store-memory=123456789" in line
    assert not [arg for arg in line if arg.startswith("--node-ip-address")]  # empty: Ray detects it


def test_a_worker_without_an_address_is_refused(ray_node) -> None:
    with pytest.raises(SystemExit, match="--address"):
        ray_node.main(["worker", "--port-base", "24000"])


def _fake_ray(tmp_path: Path) -> Path:
    """Stands in for `ray start --block`: records its arguments and pid, then blocks until SIGTERM."""
    script = tmp_path / "ray"
    script.write_text(f"#!/bin/sh\necho \"$$ $*\" > {tmp_path}/node\nexec sleep 120\n")
    script.chmod(0o755)
    return script


def test_driver_runs_the_job_once_the_workers_joined_and_stops_its_node(ray_node, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_node, "ray_cli", lambda: str(_fake_ray(tmp_path)))
    seen: list[tuple[int, int, int]] = [(2, 0, 0), (3, 1, 2), (4, 2, 4)]
    monkeypatch.setattr(ray_node, "cluster_counts", lambda address, timeout=60: seen.pop(0))
    monkeypatch.setattr(ray_node.time, "sleep", lambda seconds: None)
    job = "import os, sys; sys.exit(7 if os.environ['RAY_ADDRESS'] == 'h:1' else 1)"
    code = ray_node.main(["driver", "--address", "h:1", "--port-base", "26000", "--wait-workers", "2", "--",
                          sys.executable, "-c", job])
    assert code == 7  # the job's own status
    assert not seen  # it waited until two nodes with CPUs were there
    pid, arguments = (tmp_path / "node").read_text().split(" ", 1)
    assert "--address=h:1" in arguments and "--num-cpus=0" in arguments
    # The node was stopped: its process is gone (reaped by the driver, so no zombie either).
    assert subprocess.run(["kill", "-0", pid], capture_output=True).returncode != 0


def test_driver_gives_up_with_exit_3_when_the_workers_never_come(ray_node, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_node, "ray_cli", lambda: str(_fake_ray(tmp_path)))
    monkeypatch.setattr(ray_node, "cluster_counts", lambda address, timeout=60: (2, 1, 2))
    started = time.monotonic()
    with pytest.raises(SystemExit) as raised:
        ray_node.main(["driver", "--address", "h:1", "--wait-workers", "2", "--wait-timeout", "0.5", "--",
                       "true"])
    assert raised.value.code == ray_node.EXIT_UNAVAILABLE
    assert time.monotonic() - started < 30
    pid = (tmp_path / "node").read_text().split(" ", 1)[0]
    assert subprocess.run(["kill", "-0", pid], capture_output=True).returncode != 0


def test_driver_without_a_job_is_refused(ray_node) -> None:
    with pytest.raises(SystemExit, match="after `--`"):
        ray_node.main(["driver", "--address", "h:1"])
