#!/usr/bin/env python
"""One node of the compose `cluster` profile's Ray cluster, or a batch job run as a driver on that cluster.

    stl-ray-node head   --port 6379 --port-base 23000 --cpus 0
    stl-ray-node worker --address ray-head:6379 --port-base 24000 --cpus 2
    stl-ray-node driver --address ray-head:6379 --port-base 26000 --wait-workers 2 -- python -m index pipeline ...
    stl-ray-node check  --address ray-head:6379          # the head's healthcheck: its GCS answers

Every node gets its own block of ports from `--port-base` (B): node manager B+1, object manager B+2, dashboard
agent B+3 (HTTP) and B+4 (gRPC), runtime env agent B+5, metrics B+6, the head's dashboard process B+7 (Ray
starts it even with `--include-dashboard=false`, for its internal APIs), worker processes B+100..B+199 (no Ray
Client server: it needs ray[client], and drivers run in the cluster). On a bridge network each container has
its own ports and the blocks change nothing; on the host network (the live compose test's engine has no
bridge) the nodes share one network namespace, and Ray's defaults (one 10002-19999 worker range, 52365 for
every dashboard agent) would collide.

A driver is a Ray node too: Ray connects a driver to a raylet on its own machine (it shares that raylet's
object store in /dev/shm), so `driver` starts one with no CPUs in its container, waits until `--wait-workers`
nodes with CPUs have joined (the job sizes its actor pool from the cluster's CPUs when it starts), runs the
command, then stops its node and exits with the command's status. The driver keeps every write (feature cache,
artifact, publication); the workers only read the data volume.

Container glue, standard library and the `ray` CLI only: `import ray` happens in the `ray` processes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

WORKER_PORTS = (100, 199)  # offsets of the worker processes' port range
EXIT_UNAVAILABLE = 3  # the project's exit code for "cannot be reached / not there" (training.errors)

# The probe run with this interpreter: connects to the cluster's GCS like a driver would, prints
# "<alive nodes> <nodes with CPUs> <CPUs>" of the cluster, and leaves.
COUNT_NODES = """\
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
nodes = [node for node in ray.nodes() if node["Alive"]]
working = [node for node in nodes if node["Resources"].get("CPU", 0) > 0]
print(len(nodes), len(working), int(sum(node["Resources"].get("CPU", 0) for node in working)))
"""


def ray_cli() -> str:
    """The `ray` console script beside this interpreter (the image's venv), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "ray")
    found = beside if os.path.isfile(beside) else shutil.which("ray")
    if found is None:
        raise SystemExit("stl-ray-node: no `ray` CLI; the image needs the ray extra (PIP_EXTRAS=...,ray)")
    return found


def node_ports(base: int) -> list[str]:
    """`ray start` flags of the node's port block (see the module docstring)."""
    return [
        f"--node-manager-port={base + 1}",
        f"--object-manager-port={base + 2}",
        f"--dashboard-agent-listen-port={base + 3}",
        f"--dashboard-agent-grpc-port={base + 4}",
        f"--runtime-env-agent-port={base + 5}",
        f"--metrics-export-port={base + 6}",
        f"--min-worker-port={base + WORKER_PORTS[0]}",
        f"--max-worker-port={base + WORKER_PORTS[1]}",
    ]


def start_command(args: argparse.Namespace) -> list[str]:
    """The blocking `ray start` of this node: its role, CPUs, port block, object store and IP."""
    command = [ray_cli(), "start", "--block", "--disable-usage-stats"]
    if args.role == "head":
        # No dashboard: it needs ray[default] (the image has ray[data]) and nothing here reads it.
        command += ["--head", f"--port={args.port}", "--include-dashboard=false",
                    f"--dashboard-port={args.port_base + 7}"]
    else:
        command.append(f"--address={args.address}")
    cpus = 0 if args.role == "driver" else args.cpus
    if cpus is not None:
        command.append(f"--num-cpus={cpus}")
    if args.role == "driver":
        command.append("--num-gpus=0")
    command += node_ports(args.port_base)
    if args.object_store_bytes:
        command.append(f"--object-store-memory={args.object_store_bytes}")
    if args.node_ip:
        command.append(f"--node-ip-address={args.node_ip}")
    return command


def cluster_counts(address: str, timeout: float = 60) -> tuple[int, int, int] | None:
    """(alive nodes, nodes with CPUs, their CPUs), or None while the cluster or this node's raylet is not up."""
    try:
        probe = subprocess.run([sys.executable, "-c", COUNT_NODES, address], capture_output=True, text=True,
                               timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    fields = probe.stdout.split()[-3:] if probe.returncode == 0 else []
    return (int(fields[0]), int(fields[1]), int(fields[2])) if len(fields) == 3 else None


def wait_for_workers(address: str, workers: int, timeout: float, node: subprocess.Popen) -> tuple[int, int, int]:
    deadline = time.monotonic() + timeout
    counts = None
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise SystemExit(f"stl-ray-node: this node's `ray start` exited {node.returncode} before the job ran")
        counts = cluster_counts(address)
        if counts is not None and counts[1] >= workers:
            return counts
        time.sleep(2)
    print(f"stl-ray-node: {workers} worker node(s) with CPUs did not join {address} within {timeout:.0f} s "
          f"(last seen: {counts})", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_UNAVAILABLE)


def stop_node(node: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the blocking `ray start`: it stops the processes of its own node only (not `ray stop`, which
    kills every Ray process it can see)."""
    if node.poll() is None:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait(timeout=30)


def run_driver(args: argparse.Namespace) -> int:
    if not args.command:
        raise SystemExit("stl-ray-node driver: give the job after `--`")
    # No drain when the node stops: its only job has ended (Ray waits up to 30 s for a draining node by default).
    node = subprocess.Popen(start_command(args), env={**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    job: subprocess.Popen | None = None

    def forward(signum: int, _frame: object) -> None:  # `docker compose stop`: stop the job, then the node
        if job is not None and job.poll() is None:
            job.send_signal(signum)
        else:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        started = time.monotonic()
        nodes, working, cpus = wait_for_workers(args.address, args.wait_workers, args.wait_timeout, node)
        print(f"stl-ray-node: cluster {args.address}: {nodes} nodes, {working} with CPUs ({cpus} CPUs), "
              f"ready in {time.monotonic() - started:.1f} s; running: {' '.join(args.command)}", flush=True)
        job = subprocess.Popen(args.command, env={**os.environ, "RAY_ADDRESS": args.address})
        return job.wait()
    finally:
        stop_node(node)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stl-ray-node", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=("head", "worker", "driver", "check"))
    parser.add_argument("--address", default=os.environ.get("STL_RAY_ADDRESS"),
                        help="the head's GCS, host:port (default $STL_RAY_ADDRESS)")
    parser.add_argument("--port", type=int, default=6379, help="head: its GCS port")
    parser.add_argument("--port-base", type=int, default=23000, help="first port of this node's block")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs this node offers (default: Ray counts them)")
    parser.add_argument("--object-store-bytes", type=int,
                        default=int(os.environ.get("STL_RAY_OBJECT_STORE_BYTES") or 0) or None,
                        help="object store size (default $STL_RAY_OBJECT_STORE_BYTES, else Ray's choice); keep it "
                             "under the container's /dev/shm (shm_size) or Ray falls back to a slower /tmp")
    parser.add_argument("--node-ip", default=os.environ.get("STL_RAY_NODE_IP") or None,
                        help="IP the node advertises (default $STL_RAY_NODE_IP, else Ray detects it)")
    parser.add_argument("--wait-workers", type=int, default=1, help="driver: worker nodes to wait for")
    parser.add_argument("--wait-timeout", type=float, default=300, help="driver: seconds to wait for them")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Split by hand: an argparse REMAINDER positional would swallow the options after the role too.
    split = argv.index("--") if "--" in argv else len(argv)
    args = get_args_parser().parse_args(argv[:split])
    args.command = argv[split + 1:]
    if args.role != "head" and not args.address:
        raise SystemExit(f"stl-ray-node {args.role}: --address (or STL_RAY_ADDRESS) is required")
    if args.role == "check":
        return subprocess.run([ray_cli(), "health-check", f"--address={args.address}"], timeout=30).returncode
    if args.role == "driver":
        return run_driver(args)
    command = start_command(args)
    print("stl-ray-node: " + " ".join(command), flush=True)
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
