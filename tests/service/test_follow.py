"""STL_RELOAD_POLL_S: a replica moves to a newly published version by itself, with the reload's swap."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from index.manifest import MANIFEST_FILE
from index.publish import switch_current
from service.app import create_app
from service.settings import Settings
from tests.fixtures import serving
from tests.service.helpers import build_version, make_settings, post, scene_jpeg
from tests.service.test_fallback import metric

POLL_S = 0.05
WAIT_S = 60.0  # a bound on each wait, never a timing assertion: a wait ends as soon as its condition holds


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def served(client: httpx.Client) -> str | None:
    return client.get("/readyz").json()["index_version"]


def publish_broken(artifacts: Path, built: dict, scratch: Path) -> str:
    """A version built elsewhere, copied in with an unreadable manifest, and made current by the link switch."""
    version = build_version(built["data"], built["head1"], scratch)
    target = artifacts / "versions" / version
    shutil.copytree(scratch / "versions" / version, target)
    (target / MANIFEST_FILE).write_text("{not json")
    switch_current(artifacts, version)
    return version


def test_off_by_default(artifacts: Path) -> None:
    assert Settings(artifacts=artifacts).reload_poll_s == 0
    with TestClient(create_app(make_settings(artifacts))) as client:
        assert client.app.state.follower is None
        assert client.get("/readyz").json()["follow"] is None
        assert metric(client, "stl_reload_poll_seconds") == 0
        assert metric(client, "stl_reload_poll_looks_total") == 0


@pytest.mark.parametrize("overrides", [{"reload_poll_s": -1}, {"reload_poll_s": float("nan")},
                                       {"reload_poll_s": 5, "index_version": "v1"}])
def test_settings_refuse_a_negative_poll_or_a_pin(tmp_path: Path, overrides: dict) -> None:
    with pytest.raises(ValidationError, match="reload_poll_s"):
        Settings(artifacts=tmp_path, **overrides)


def test_follows_a_publish_answering_every_request(artifacts: Path, built: dict) -> None:
    """Real uvicorn: a publish moves the replica by itself, and no request around the swap fails."""
    app = create_app(make_settings(artifacts, reload_poll_s=POLL_S))
    per_worker: list[list[str]] = [[], []]
    failures: list[str] = []
    stop = threading.Event()
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        old = served(client)
        assert app.state.follower.running and metric(client, "stl_reload_poll_seconds") == POLL_S

        def hammer(n: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as own:
                while not stop.is_set():
                    response = own.post("/recommend", data={"category": "Shoes", "k": "3"},
                                        files={"image": ("s.jpg", scene_jpeg(n), "image/jpeg")})
                    if response.status_code != 200 or response.json()["source"] != "embedding":
                        failures.append(f"{response.status_code}: {response.text}")
                    else:
                        per_worker[n].append(response.json()["index_version"])

        workers = [threading.Thread(target=hammer, args=(n,)) for n in range(2)]
        for worker in workers:
            worker.start()
        try:
            wait_for(lambda: all(old in seen for seen in per_worker), "answers from the old version")
            newer = build_version(built["data"], built["head1"], artifacts)  # the project's build and publish
            wait_for(lambda: served(client) == newer, "the replica to serve the new version")
            wait_for(lambda: all(newer in seen for seen in per_worker), "answers from the new version")
        finally:
            stop.set()
            for worker in workers:
                worker.join(30)
        assert metric(client, "stl_reloads_total", outcome="reloaded") == 1
        assert metric(client, "stl_reload_poll_seen_info", version=newer) == 1
        assert client.get("/readyz").json()["follow"]["seen"] == newer  # an operator sees what it follows
    assert not app.state.follower.running  # stopped with the lifespan
    assert failures == []
    for seen in per_worker:  # one swap: each client's answers go old, old, ..., new, new and never back
        assert seen == [old] * seen.index(newer) + [newer] * (len(seen) - seen.index(newer))


def test_a_broken_version_keeps_the_served_one_until_current_moves(artifacts: Path, built: dict,
                                                                   tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(artifacts, reload_poll_s=POLL_S))) as client:
        old = served(client)
        broken = publish_broken(artifacts, built, tmp_path / "scratch")
        wait_for(lambda: metric(client, "stl_reloads_total", outcome="failed") >= 1, "the failed reload")
        looks = metric(client, "stl_reload_poll_looks_total")
        wait_for(lambda: metric(client, "stl_reload_poll_looks_total") >= looks + 5, "more looks")
        assert metric(client, "stl_reloads_total", outcome="failed") == 1  # not retried at every look
        assert metric(client, "stl_reload_poll_seen_info", version=broken) == 1
        assert served(client) == old
        assert post(client, k=2).json()["source"] == "embedding"
        # current moves again, to a good version: followed.
        newer = build_version(built["data"], built["head1"], artifacts)
        wait_for(lambda: served(client) == newer, "the replica to serve the next good version")
        assert metric(client, "stl_reloads_total", outcome="reloaded") == 1
        assert metric(client, "stl_reloads_total", outcome="failed") == 1
        assert post(client, k=2).json()["index_version"] == newer


def test_a_drain_stops_the_follower(artifacts: Path) -> None:
    with TestClient(create_app(make_settings(artifacts, reload_poll_s=POLL_S))) as client:
        follower = client.app.state.follower
        wait_for(lambda: metric(client, "stl_reload_poll_looks_total") >= 1, "a first look")
        assert follower.running
        client.app.state.admission.start_drain()
        wait_for(lambda: not follower.running, "the follower to stop")  # on its own: the lifespan is still up
