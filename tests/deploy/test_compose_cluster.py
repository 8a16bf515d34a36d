"""Live: the compose `cluster` profile on one machine: a Ray head, two workers, and `indexer-cluster` running the
pipeline on them (`--engine ray`), with the real engine of tests/deploy/stack.py (host network: the nodes keep
their own port blocks). It shares the engine and the indexer image with test_compose.py (conftest.py); skipped,
with the reason, where no engine can run. Alone (prints each stage's seconds):
    .venv/bin/python -m pytest -q -m compose tests/deploy/test_compose_cluster.py -o log_cli=true -o log_cli_level=INFO
or, printing the whole report: `.venv/bin/python -m tests.deploy.cluster`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.deploy.cluster import JOB, NODES, PROFILE, ClusterRun, cluster_project, run_cluster_job
from tests.deploy.stack import CommandFailed, ComposeProject, LiveEngine, project_down, stage

pytestmark = [pytest.mark.compose, pytest.mark.slow]


@dataclass
class Cluster:
    project: ComposeProject
    run: ClusterRun


@pytest.fixture(scope="module")
def cluster(live_engine: LiveEngine) -> Iterator[Cluster]:
    project: ComposeProject | None = None
    try:
        project = cluster_project(live_engine)
        try:
            run = run_cluster_job(project, live_engine.timings)
        except CommandFailed as exc:
            raise CommandFailed(f"{exc}\n--- compose logs ---\n{project.logs(120)}") from None
        live_engine.timings["cluster run s"] = run.seconds
        for name, work in run.nodes.items():  # in the terminal summary: where the work ran
            live_engine.timings[f"{name} embed actors"] = float(work.embed_actors)
            live_engine.timings[f"{name} index tasks"] = float(work.index_tasks)
        yield Cluster(project, run)
    finally:
        if project is not None:
            with stage(live_engine.timings, "cluster down"):
                leftovers = project_down(project, profiles=(PROFILE,))
            assert not leftovers, f"the cluster test left behind: {leftovers}"


def test_the_job_joins_the_whole_cluster_and_publishes(cluster: Cluster) -> None:
    run = cluster.run
    assert run.exit_code == 0, run.job_log[-4000:]
    # Head and job offer no CPUs; the two workers 2 each (STL_RAY_WORKER_CPUS).
    assert run.cluster_ready and re.search(r"4 nodes, 2 with CPUs \(4 CPUs\)", run.cluster_ready), run.cluster_ready
    assert "joining the Ray cluster at 127.0.0.1:" in run.job_log
    assert run.published, run.job_log[-2000:]
    # The executor left no CPU for a driver on these nodes: 4 CPUs, 3 actors.
    assert run.pool and "through 3 actor(s)" in run.pool, run.pool


def test_the_embedding_actors_and_index_builds_ran_on_the_workers(cluster: Cluster) -> None:
    nodes = cluster.run.nodes
    head, workers = nodes[NODES[0]], [nodes[name] for name in NODES[1:]]
    assert head.embed_actors == 0 and head.index_tasks == 0, head  # no CPUs on the head
    # Three one-CPU actors on two 2-CPU nodes: each pool spans both workers.
    assert all(worker.embed_actors >= 1 for worker in workers), nodes
    assert sum(worker.index_tasks for worker in workers) >= 1, nodes


def test_the_published_version_verifies_and_is_current(cluster: Cluster) -> None:
    project = cluster.project
    verify = project("--profile", PROFILE, "run", "--rm", "--no-deps", "--entrypoint", "python", JOB,
                     "-m", "index", "verify", "/artifacts", timeout=600, check=False)
    assert verify.returncode == 0, verify.stdout[-3000:] + verify.stderr[-3000:]
    current = project("--profile", PROFILE, "run", "--rm", "--no-deps", "--entrypoint", "python", JOB, "-c",
                      "from index.artifact import current_version; print(current_version('/artifacts'))",
                      timeout=300).stdout.split()[-1]
    assert current == cluster.run.published
