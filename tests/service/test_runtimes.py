"""STL_RUNTIME / STL_PRECISION: every runtime answers the same top-10 through the real app, a version without
an export is served by torch and says so, bf16 is refused at start where it cannot run, and `python -m service`
over an export never imports torch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.launch import wait_until_ready
from tests.service.helpers import build_version, make_settings, post, scene_jpeg
from training.model.runtimes import RuntimeUnavailable, installed
from training.model.runtimes import openvino_runtime as ov_runtime

ROOT = Path(__file__).resolve().parents[2]
RUNTIMES = [name for name in ("openvino", "onnxruntime") if installed(name)]
QUERIES = [(seed, category, bbox) for seed in range(4) for category, bbox in
           (("Shoes", "0.1,0.1,0.8,0.9"), ("Handbags", None), ("Pants", "0.3,0.2,0.9,0.7"))]


def top10(client: TestClient) -> list[list[tuple[str, float]]]:
    answers = []
    for seed, category, bbox in QUERIES:
        response = post(client, scene_jpeg(seed), category, k=10, bbox=bbox, dedup="false")
        assert response.status_code == 200 and response.json()["source"] == "embedding", response.text
        answers.append([(item["product_id"], item["score"]) for item in response.json()["items"]])
    return answers


@pytest.fixture(scope="module")
def torch_answers(built: dict) -> list[list[tuple[str, float]]]:
    with TestClient(create_app(make_settings(built["root"], runtime="torch"))) as client:
        assert client.get("/readyz").json()["runtime"] == "torch (fp32)"
        return top10(client)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_every_runtime_gives_torch_s_top_10_through_the_app(built: dict, torch_answers: list, runtime: str) -> None:
    with TestClient(create_app(make_settings(built["root"], runtime=runtime))) as client:
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["runtime"] == f"{runtime} (fp32)"
        answers = top10(client)
    assert [[pid for pid, _ in page] for page in answers] == [[pid for pid, _ in page] for page in torch_answers]
    scores = np.array([score for page in answers for _, score in page])
    reference = np.array([score for page in torch_answers for _, score in page])
    np.testing.assert_allclose(scores, reference, atol=1e-4)


def test_auto_serves_the_export_with_openvino_on_a_cpu(client: TestClient) -> None:
    if not installed("openvino"):
        pytest.skip("openvino is not installed")
    ready = client.get("/readyz").json()
    assert ready["runtime"] == "openvino (fp32)"


def test_a_version_without_export_is_served_by_torch_and_says_so(built: dict, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    build_version(built["data"], built["head0"], root, export=False)
    with TestClient(create_app(make_settings(root))) as client:
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["runtime"] == "torch (no export in this version)"
        assert post(client, k=3).json()["source"] == "embedding"


def test_a_checkpoint_override_is_served_by_torch(built: dict) -> None:
    with TestClient(create_app(make_settings(built["root"], checkpoint=built["head0"]))) as client:
        assert client.get("/readyz").json()["runtime"] == "torch (STL_CHECKPOINT overrides the version's model)"


def test_bf16_is_refused_at_start_where_it_cannot_run(built: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RuntimeUnavailable, match="OpenVINO only"):
        create_app(make_settings(built["root"], runtime="torch", precision="bf16"))
    monkeypatch.setattr("service.encoder.cpu_supports_bf16", lambda: False)
    with pytest.raises(RuntimeUnavailable, match="AVX-512 BF16 or AMX"):
        create_app(make_settings(built["root"], runtime="openvino", precision="bf16"))


@pytest.mark.skipif(not ov_runtime.cpu_supports_bf16(), reason="this CPU has no bf16")
def test_bf16_serves_where_the_cpu_has_it(built: dict) -> None:
    with TestClient(create_app(make_settings(built["root"], runtime="openvino", precision="bf16"))) as client:
        assert client.get("/readyz").json()["runtime"] == "openvino (bf16)"
        assert post(client, k=3).json()["source"] == "embedding"


@pytest.fixture
def service_process(built: dict) -> Iterator[str]:
    """`python -m service` over the tiny artifact (it has an export), on a free loopback port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "STL_ARTIFACTS": str(built["root"]), "STL_DEVICE": "cpu", "STL_RUNTIME": "auto",
           "STL_LOG_LEVEL": "INFO"}
    server = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, server, timeout_s=120)
        yield url
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
        print(output)
    assert "serving with runtime openvino (fp32)" in output  # the start-up log says what serves


@pytest.mark.skipif(not installed("openvino"), reason="openvino is not installed")
def test_the_served_process_never_imports_torch(service_process: str) -> None:
    url = service_process
    response = httpx.post(f"{url}/recommend", data={"category": "Shoes", "k": "3", "bbox": "0.1,0.1,0.8,0.9"},
                          files={"image": ("s.jpg", scene_jpeg(3), "image/jpeg")}, timeout=30)
    assert response.status_code == 200 and response.json()["source"] == "embedding"
    ready = httpx.get(f"{url}/readyz", timeout=10).json()
    assert ready["runtime"] == "openvino (fp32)" and ready["torch_loaded"] is False
