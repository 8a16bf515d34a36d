"""Metrics move with traffic; settings come from STL_* variables and reject nonsense."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.engine import batch_workers
from service.settings import Settings, get_settings
from tests.service.helpers import make_settings, post
from tests.service.test_fallback import metric


def test_metrics_count_requests_latency_and_batches(artifacts: Path) -> None:
    with TestClient(create_app(make_settings(artifacts, batch_max_wait_ms=20))) as client:
        threads = [threading.Thread(target=post, args=(client,), kwargs={"k": 2}) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        post(client, strategy="popularity")
        post(client, b"not an image")
        ok = metric(client, "stl_requests_total", route="/recommend", status="200", source="embedding")
        assert ok == 6
        assert metric(client, "stl_requests_total", route="/recommend", status="200", source="popularity") == 1
        assert metric(client, "stl_requests_total", route="/recommend", status="400", source="") == 1
        assert metric(client, "stl_request_latency_seconds_count", route="/recommend") == 8
        # Six crops were embedded, in however many batches the timing gave.
        assert metric(client, "stl_batch_size_sum") == 6
        assert 1 <= metric(client, "stl_batch_size_count") <= 6
        assert metric(client, "stl_fallbacks_total", reason="strategy") == 1
        assert metric(client, "stl_index_info", status="ready") == 1
        assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_two_apps_do_not_share_metrics(artifacts: Path) -> None:
    with (TestClient(create_app(make_settings(artifacts))) as one,
          TestClient(create_app(make_settings(artifacts))) as two):
        post(one, k=1)
        assert metric(one, "stl_requests_total", route="/recommend", status="200", source="embedding") == 1
        assert metric(two, "stl_requests_total", route="/recommend", status="200", source="embedding") == 0


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STL_ARTIFACTS", str(tmp_path))
    monkeypatch.setenv("STL_MAX_UPLOAD_MB", "2.5")
    monkeypatch.setenv("STL_BATCH_MAX_SIZE", "16")
    monkeypatch.setenv("STL_ADMIN_TOKEN", "abc")
    monkeypatch.setenv("STL_LOG_LEVEL", "debug")
    settings = get_settings()
    assert settings.artifacts == tmp_path and settings.batch_max_size == 16
    assert settings.max_upload_bytes == int(2.5 * 1024 * 1024)
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == "abc"
    assert "abc" not in repr(settings)  # a SecretStr never shows up in logs
    assert settings.log_level == "DEBUG"
    monkeypatch.setenv("STL_ADMIN_TOKEN", "")
    assert get_settings().admin_enabled is False


@pytest.mark.parametrize(("field", "value"), [("device", "tpu"), ("max_upload_mb", 0), ("batch_max_size", 0),
                                              ("log_level", "chatty"), ("max_image_pixels", 10)])
def test_settings_reject_nonsense(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


def test_batch_workers_default_to_one_per_torch_thread_with_torch_on_a_cpu(tmp_path: Path) -> None:
    assert batch_workers(Settings(artifacts=tmp_path, device="cpu", runtime="torch")) == torch.get_num_threads()
    assert batch_workers(Settings(artifacts=tmp_path, device="cpu", batch_workers=3)) == 3
    # OpenVINO's own pool runs one pass on every core: one worker (service/batching.py measured why).
    assert batch_workers(Settings(artifacts=tmp_path, device="cpu", runtime="openvino")) == 1
    assert batch_workers(Settings(artifacts=tmp_path, device="cuda", runtime="torch")) == 1
