"""Graceful drain: SIGTERM to a real `python -m service` under load (20 clients on 127.0.0.1, bounded)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from service.launch import wait_until_ready
from tests.service.helpers import scene_jpeg

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 20
MAX_REQUESTS_PER_CLIENT = 200  # a bound on the load whatever happens; a client stops at its first 503


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sigterm_drains_admitted_requests_and_exits_0(artifacts: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "STL_ARTIFACTS": str(artifacts), "STL_DEVICE": "cpu", "STL_DRAIN_S": "20",
           "STL_LOG_LEVEL": "INFO", "STL_BATCH_MAX_WAIT_MS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("STL_ADMIN_TOKEN", None)
    env.pop("STL_API_KEYS", None)
    log = (tmp_path / "server.log").open("w+")
    server = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port)], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(url, server, timeout_s=120)
        statuses, errors, ready = asyncio.run(_load_then_sigterm(url, server))
        code = server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
        log.seek(0)
        output = log.read()
        log.close()
    assert code == 0, output
    assert errors == [], errors  # no request dropped mid-way, no connection refused or reset
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) == CLIENTS  # each client stopped at its own refusal...
    assert statuses.count(200) >= CLIENTS  # ...after its requests before and during the drain were answered
    assert ready == (503, "draining")
    assert "draining" in output


async def _load_then_sigterm(url: str, server: subprocess.Popen) -> tuple[list[int], list[str], tuple[int, str]]:
    statuses: list[int] = []
    errors: list[str] = []
    answered = asyncio.Event()
    body = scene_jpeg()
    limits = httpx.Limits(max_connections=CLIENTS + 2)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def one_client() -> None:
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                try:
                    response = await client.post("/recommend", data={"category": "Shoes", "k": "3"},
                                                 files={"image": ("s.jpg", body, "image/jpeg")})
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                    return
                statuses.append(response.status_code)
                if response.status_code == 200:
                    answered.set()
                else:
                    return

        clients = [asyncio.create_task(one_client()) for _ in range(CLIENTS)]
        await asyncio.wait_for(answered.wait(), 60)
        await asyncio.sleep(0.3)  # the load in full swing: requests queued and in a forward pass
        server.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.05)
        probe = await client.get("/readyz")
        ready = (probe.status_code, probe.json()["status"])
        await asyncio.wait_for(asyncio.gather(*clients), 60)
    return statuses, errors, ready


def test_keep_alive_outlasts_the_clients_idle_timeout(monkeypatch) -> None:
    # uvicorn's default (5 s) equals httpx's keepalive_expiry: a reused connection raced the server's close.
    from service import server
    from service.settings import Settings

    configs = []
    monkeypatch.setattr(server.DrainingServer, "run", lambda self: configs.append(self.config))

    class App:
        class state:  # noqa: N801  (what serve reads of a FastAPI app)
            admission = None

    server.serve(App(), "127.0.0.1", 0, "warning", 15.0, Settings().keep_alive_s)
    assert configs[0].timeout_keep_alive == 75.0 > httpx.Limits().keepalive_expiry
