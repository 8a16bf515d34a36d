"""Admin auth and hot reload, including a reload while concurrent requests are in flight."""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi.testclient import TestClient
from pydantic import SecretStr

from index.artifact import current_version
from index.publish import switch_current
from service.app import create_app
from tests.service.helpers import build_version, make_settings, post, scene_jpeg
from training.model.runtimes import ExportManifest

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_admin_disabled_without_token(client: TestClient) -> None:
    response = client.post("/admin/reload", headers=AUTH)
    assert response.status_code == 403
    assert "disabled" in response.json()["detail"]


def test_admin_requires_the_right_token(artifacts: Path) -> None:
    with TestClient(create_app(make_settings(artifacts, admin_token=SecretStr(TOKEN)))) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": TOKEN}):
            response = client.post("/admin/reload", headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"] == "Bearer"
        response = client.post("/admin/reload", headers=AUTH)
        assert response.status_code == 200
        assert response.json()["status"] == "unchanged"


def test_reload_switches_to_newer_version(artifacts: Path, built: dict) -> None:
    with TestClient(create_app(make_settings(artifacts, admin_token=SecretStr(TOKEN)))) as client:
        old = client.get("/readyz").json()["index_version"]
        before = post(client, k=5).json()
        newer = build_version(built["data"], built["head1"], artifacts)  # another head: other vectors
        assert newer > old and current_version(artifacts) == newer
        assert post(client, k=5).json()["index_version"] == old  # nothing changes until the reload
        response = client.post("/admin/reload", headers=AUTH)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "reloaded" and body["ready"] == "ready"
        assert body["previous_version"] == old and body["index_version"] == newer
        after = post(client, k=5).json()
        assert after["index_version"] == newer and after["source"] == "embedding"
        assert [i["score"] for i in after["items"]] != [i["score"] for i in before["items"]]
        assert client.get("/readyz").json()["index_version"] == newer
        # A version that does not exist is refused and the served one stays.
        missing = client.post("/admin/reload", params={"version": "nope"}, headers=AUTH)
        assert missing.status_code == 409 and "does not exist" in missing.json()["detail"]
        assert client.get("/readyz").json()["index_version"] == newer


def test_reload_of_a_name_that_cannot_be_a_version_is_409(artifacts: Path) -> None:
    with TestClient(create_app(make_settings(artifacts, admin_token=SecretStr(TOKEN)))) as client:
        served = client.get("/readyz").json()["index_version"]
        for name in ("a" * 300, f"../versions/{served}", "nope"):  # found by fuzzing: 300 chars were a 500
            response = client.post("/admin/reload", headers=AUTH, params={"version": name})
            assert response.status_code == 409, name
            assert "still serving" in response.json()["detail"]
        assert client.get("/readyz").json()["index_version"] == served


def test_reload_refuses_a_broken_version(artifacts: Path, built: dict) -> None:
    with TestClient(create_app(make_settings(artifacts, admin_token=SecretStr(TOKEN)))) as client:
        old = client.get("/readyz").json()["index_version"]
        newer = build_version(built["data"], built["head1"], artifacts)
        # The exported model that serves it (OpenVINO), not the head checkpoint torch would read.
        export = artifacts / "versions" / newer / "export"
        (export / ExportManifest.read(export).backbone_file).write_bytes(b"garbage")
        response = client.post("/admin/reload", headers=AUTH)
        assert response.status_code == 409 and "cannot serve embeddings" in response.json()["detail"]
        assert client.get("/readyz").json()["index_version"] == old
        assert post(client, k=2).json()["source"] == "embedding"


def test_reload_during_concurrent_requests(artifacts: Path, built: dict) -> None:
    """No request fails, and each answer is exactly the one its reported version gives (no mixing)."""
    settings = make_settings(artifacts, admin_token=SecretStr(TOKEN), batch_max_size=4)
    first = current_version(artifacts)
    second = build_version(built["data"], built["head1"], artifacts)
    switch_current(artifacts, first)
    images = [scene_jpeg(seed) for seed in range(4)]
    with TestClient(create_app(settings)) as client:
        def answer(image: bytes) -> tuple[str, list]:
            body = post(client, image, k=4, bbox="0.1,0.1,0.9,0.9").json()
            return body["index_version"], [(i["product_id"], round(i["score"], 4)) for i in body["items"]]

        expected = {}
        for version in (first, second):
            switch_current(artifacts, version)
            assert client.post("/admin/reload", headers=AUTH).json()["index_version"] == version
            for n, image in enumerate(images):
                got_version, items = answer(image)
                assert got_version == version
                expected[version, n] = items
        assert expected[first, 0] != expected[second, 0]

        failures: list[str] = []
        seen: list[str] = []
        stop = threading.Event()

        def hammer(n: int) -> None:
            while not stop.is_set():
                response = post(client, images[n], k=4, bbox="0.1,0.1,0.9,0.9")
                if response.status_code != 200 or response.json()["source"] != "embedding":
                    failures.append(response.text)
                    continue
                body = response.json()
                items = [(i["product_id"], round(i["score"], 4)) for i in body["items"]]
                seen.append(body["index_version"])
                if items != expected[body["index_version"], n]:
                    failures.append(f"mixed answer for {body['index_version']}: {items}")

        workers = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
        for worker in workers:
            worker.start()
        for version in (first, second, first, second):
            switch_current(artifacts, version)
            response = client.post("/admin/reload", headers=AUTH)
            assert response.status_code == 200 and response.json()["index_version"] == version
        stop.set()
        for worker in workers:
            worker.join(30)
        assert failures == []
        assert len(seen) >= 8 and {first, second} <= set(seen)
        assert client.get("/readyz").json()["index_version"] == second
