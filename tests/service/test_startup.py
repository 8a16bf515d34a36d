"""Start-up: the port answers while the model and indexes load; /readyz says 503 'loading' until done."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import service.versions
from service.app import create_app
from tests.service.helpers import make_settings, post


def test_readyz_is_503_loading_until_the_background_load_finishes(artifacts: Path, monkeypatch) -> None:
    release = threading.Event()
    real_load = service.versions.load_version

    def slow_load(*args, **kwargs):
        release.wait(timeout=30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(service.versions, "load_version", slow_load)
    with TestClient(create_app(make_settings(artifacts, background_load=True))) as client:
        assert client.get("/healthz").status_code == 200
        loading = client.get("/readyz")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        assert post(client).status_code == 503
        release.set()
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/readyz").json()["status"] == "ready"
        assert post(client).status_code == 200


def test_the_model_is_loaded_in_a_thread_that_ends(artifacts: Path) -> None:
    # A long-lived thread that ran the model would keep its own OpenMP team, slowing the batcher's.
    loaders: list[threading.Thread] = []
    real_load = service.versions.load_version

    def recording_load(*args, **kwargs):
        loaders.append(threading.current_thread())
        return real_load(*args, **kwargs)

    monkey = pytest.MonkeyPatch()
    monkey.setattr(service.versions, "load_version", recording_load)
    try:
        with TestClient(create_app(make_settings(artifacts, background_load=False))) as client:
            assert client.get("/readyz").json()["status"] == "ready"
            loaders[0].join(10)
            assert loaders[0].name == "stl-load" and not loaders[0].is_alive()
            assert post(client).status_code == 200
    finally:
        monkey.undo()
