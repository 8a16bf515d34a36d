"""The real server: uvicorn on a loopback ephemeral port, real HTTP, stopped at the end."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.__main__ import main
from service.app import create_app
from tests.fixtures import serving
from tests.service.helpers import make_settings, scene_jpeg


@pytest.fixture
def server_url(artifacts: Path) -> Iterator[str]:
    with serving(create_app(make_settings(artifacts))) as url:
        yield url


def test_real_uvicorn_concurrent_requests(server_url: str) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server_url, timeout=30) as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "ready"
            requests = [
                client.post("/recommend", data={"category": "Shoes", "k": "3", "bbox": "0.1,0.1,0.8,0.9"},
                            files={"image": ("s.jpg", scene_jpeg(seed), "image/jpeg")})
                for seed in range(12)
            ]
            responses = list(await asyncio.gather(*requests))
            responses.append(await client.post("/recommend", data={"category": "Shoes"},
                                               files={"image": ("x.gif", b"GIF89a...", "image/gif")}))
            return responses

    responses = asyncio.run(run())
    assert [r.status_code for r in responses[:-1]] == [200] * 12
    assert all(r.json()["source"] == "embedding" and len(r.json()["items"]) == 3 for r in responses[:-1])
    assert responses[-1].status_code == 400 and "not an image" in responses[-1].json()["detail"]
    metrics = httpx.get(f"{server_url}/metrics").text
    assert 'stl_requests_total{route="/recommend",source="embedding",status="200"} 12.0' in metrics


def test_cli_rejects_bad_configuration(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("STL_BATCH_MAX_SIZE", "-3")
    assert main(["--port", "0"]) == 2
    assert "batch_max_size" in capsys.readouterr().err
