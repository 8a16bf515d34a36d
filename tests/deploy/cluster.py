"""A live run of the compose `cluster` profile: a Ray head, two workers and the pipeline job as their driver.

On the harness's private engine (tests/deploy/stack.py: host network, no pulls) it builds the indexer image,
runs `docker compose --profile cluster up indexer-cluster`, waits for the job to exit and reads what happened
from the containers: the job's log (exit code, published version, actor pool) and each Ray node's session logs
(which node ran the embedding actors and the index-build tasks). tests/deploy/test_compose_cluster.py asserts
on it; alone it prints the report as JSON and cleans everything up:

    .venv/bin/python -m tests.deploy.cluster [--scenes 160] [--products 160]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field

from tests.deploy.stack import (
    CommandFailed,
    ComposeProject,
    LiveEngine,
    Unavailable,
    free_port,
    project_down,
    stage,
    start_live_engine,
)

LOG = logging.getLogger(__name__)

PROFILE = "cluster"
NODES = ("ray-head", "ray-worker-1", "ray-worker-2")
JOB = "indexer-cluster"
# Enough products and scenes for several blocks of 64 images: with a single block one actor gets all the work.
SCENES = 160
PRODUCTS = 160
JOB_TIMEOUT_S = 1500
# Where each node's Ray writes its logs (the image's user runs Ray; /tmp is the container's own).
SESSION_LOGS = "/tmp/ray/session_latest/logs"
# Ray marks each worker process's log with what it runs: ":actor_name:<class>" or ":task_name:<function>".
EMBED_ACTOR = "_EmbedActor"
INDEX_TASK = "category_index"


@dataclass
class NodeWork:
    """What one Ray node ran: its embedding actor processes, and the index-build task executions."""

    embed_actors: int = 0  # worker processes that held an embedding actor
    index_tasks: int = 0  # runs of the per-category index build
    markers: dict[str, int] = field(default_factory=dict)  # every ":actor_name:" / ":task_name:" line, counted


@dataclass
class ClusterRun:
    exit_code: int | None
    published: str | None
    job_log: str
    nodes: dict[str, NodeWork]
    seconds: float
    pool: str | None = None  # the executor's "ray: N items through K actor(s) (...)" lines
    cluster_ready: str | None = None  # stl-ray-node's "cluster ...: N nodes, ..." line


def cluster_variables(scenes: int = SCENES, products: int = PRODUCTS, worker_cpus: int = 2) -> dict[str, str]:
    """Compose variables of a host-network cluster run: the head on loopback at a free GCS port."""
    return {
        "STL_RAY_HEAD": "127.0.0.1",
        "STL_RAY_PORT": str(free_port()),
        "STL_RAY_WORKER_CPUS": str(worker_cpus),
        "STL_DEMO_SCENES": str(scenes),
        "STL_DEMO_PRODUCTS": str(products),
        "STL_DEMO_SEED": "0",
        "STL_DEVICE": "cpu",
        # The detector trains in the driver, not on the cluster: one epoch (of 4) is enough to publish one.
        "STL_DETECTOR_EPOCHS": "1",
        # The host-network override's api command needs it, although no api runs here.
        "STL_PORT": str(free_port()),
    }


def node_work(project: ComposeProject, service: str) -> NodeWork:
    """Count the actor processes and task runs in the node's Ray worker logs.

    Ray starts each worker process's stdout log (worker-*.out; .err gets the same lines) with what it runs
    and marks every task run: ":actor_name:<class>" once per actor process, ":task_name:<function>" per run."""
    listing = project("exec", "-T", service, "sh", "-c",
                      f"for log in {SESSION_LOGS}/worker-*.out; do [ -f \"$log\" ] || continue; "
                      "grep -E '^:(actor|task)_name:' \"$log\" | sort | uniq -c | sed \"s|^|$log |\"; done",
                      timeout=120, check=False).stdout
    markers: dict[str, int] = {}
    embed = tasks = 0
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) != 3:
            continue
        _, count, marker = fields
        markers[marker] = markers.get(marker, 0) + int(count)
        if marker.startswith(":actor_name:") and EMBED_ACTOR in marker:
            embed += 1  # one log file: one actor process
        elif marker == f":task_name:{INDEX_TASK}":
            tasks += int(count)
    return NodeWork(embed, tasks, markers)


def wait_exited(project: ComposeProject, service: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = project.inspect(service)["State"]
        if not state.get("Running", False) and state.get("Status") in {"exited", "dead"}:
            return int(state["ExitCode"])
        time.sleep(5)
    raise CommandFailed(f"{service} still runs after {timeout:.0f} s\n{project.logs(80)}")


def run_cluster_job(project: ComposeProject, timings: dict[str, float], timeout: float = JOB_TIMEOUT_S) -> ClusterRun:
    """`up` the profile's job (its head and workers come with it), wait for it, and read what each node ran."""
    started = time.monotonic()
    with stage(timings, "cluster up"):
        # Returns once the head is healthy and the workers and the job have started (depends_on).
        project("--profile", PROFILE, "up", "--detach", "--no-build", JOB, timeout=600)
    with stage(timings, "cluster job"):
        exit_code = wait_exited(project, JOB, timeout)
    seconds = round(time.monotonic() - started, 1)
    log = project("logs", "--no-color", JOB, timeout=120, check=False).stdout
    published = re.search(r"^(?:\S+\s+\|\s+)?published (\S+) under", log, re.MULTILINE)
    pools = [line.split("ray_executor: ", 1)[-1] for line in log.splitlines() if "items through" in line]
    ready = next((line.split("stl-ray-node: ", 1)[-1] for line in log.splitlines()
                  if "stl-ray-node: cluster" in line), None)
    nodes = {service: node_work(project, service) for service in NODES}
    return ClusterRun(exit_code, published.group(1) if published else None, log, nodes, seconds,
                      "\n".join(pools) or None, ready)


def cluster_project(live: LiveEngine, **variables: int) -> ComposeProject:
    project = live.project(f"stl-compose-cluster-{os.getpid()}", cluster_variables(**variables))
    live.build(project, (JOB, *NODES), profiles=(PROFILE,))
    return project


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=SCENES)
    parser.add_argument("--products", type=int, default=PRODUCTS)
    parser.add_argument("--worker-cpus", type=int, default=2, help="CPUs each Ray worker node offers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    timings: dict[str, float] = {}
    try:
        live = start_live_engine(timings)
    except Unavailable as exc:
        print(f"cannot run here: {exc}", file=sys.stderr)
        return 3
    run: ClusterRun | None = None
    leftovers: list[str] = []
    project: ComposeProject | None = None
    try:
        project = cluster_project(live, scenes=args.scenes, products=args.products, worker_cpus=args.worker_cpus)
        run = run_cluster_job(project, timings)
    finally:
        if project is not None:
            if run is None:
                print(project.logs(120), file=sys.stderr)
            with stage(timings, "compose down"):
                leftovers += project_down(project, profiles=(PROFILE,))
        leftovers += live.close()
    report = {key: value for key, value in asdict(run).items() if key != "job_log"}
    report.update(timings=timings, leftovers=leftovers, job_log_tail=run.job_log[-3000:])
    print(json.dumps(report, indent=2))
    return 0 if run.exit_code == 0 and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
