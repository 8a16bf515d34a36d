"""ASGI middleware: upload size limit (enforced while reading) and per-request metrics."""

from __future__ import annotations

import json
import time

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

# Room for the multipart envelope and the small form fields beside the image itself.
FORM_OVERHEAD_BYTES = 64 * 1024


class BodySizeLimit:
    """413 as soon as a request body is known to exceed the limit: from Content-Length before reading
    anything, else by counting bytes as they arrive (chunked uploads), so a huge body is never buffered."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes + FORM_OVERHEAD_BYTES
        self.limit_mb = max_bytes / (1024 * 1024)

    def _message(self) -> str:
        return f"the upload is larger than STL_MAX_UPLOAD_MB = {self.limit_mb:g} MB"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = False  # the server itself rejects a malformed Content-Length
            if too_big:
                await _send_json(send, 413, {"detail": self._message()})
                return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route's body parsing, so FastAPI answers it like any HTTPException.
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counting_receive, send)


class RequestMetrics:
    """Counts every request by route template, status and recommendation source, and times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            # Template, not raw path, so label values stay bounded; unmatched paths share one label.
            label = getattr(route, "path", None) or "unmatched"
            source = (scope.get("state") or {}).get("source", "")
            self.metrics.requests.labels(route=label, status=str(status), source=source).inc()
            self.metrics.latency.labels(route=label).observe(time.perf_counter() - started)


async def _send_json(send: Send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
