"""ASGI middleware: the admission gate (drain, budget, deadlines, disconnects), the upload size limit
(enforced while reading) and per-request metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.admission import TIMEOUT_HEADER, Admission, BadTimeout, Unavailable
from service.metrics import Metrics

# The API the gate guards (drain, deadlines, disconnects); the page, the docs, the probes, /metrics and
# /admin pass straight through. Only scenes go through the batcher's queue, so only they meet its budget.
API_PATHS = ("/recommend", "/detect", "/shop", "/products/", "/facets", "/categories", "/examples")
SCENE_PATH = "/recommend"
# Scene uploads: admitted only while the expected queue wait fits the budget (/shop embeds several crops).
SCENE_PATHS = (SCENE_PATH, "/detect", "/shop")
_TIMEOUT_HEADER = TIMEOUT_HEADER.encode()
# A refused body is read and dropped up to this size (past it the connection is simply closed).
DISCARD_LIMIT_BYTES = 16 * 1024 * 1024

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
            state = scope.get("state") or {}
            # A refusal at the gate comes before routing; it names the route it refused, if it knows it.
            label = getattr(route, "path", None) or state.get("refused_route") or "unmatched"
            source = state.get("source", "")
            self.metrics.requests.labels(route=label, status=str(status), source=source).inc()
            self.metrics.latency.labels(route=label).observe(time.perf_counter() - started)


class AdmissionGate:
    """Decides at the door, before a body is read, and bounds each API request's time.

    While draining every API request gets 503 (and `Connection: close`, so that clients reconnect
    elsewhere). A scene whose expected queue wait exceeds the budget gets 503 with Retry-After. An
    admitted request runs with a deadline (the route hands it to the engine, which gives it to its
    batcher job); if no answer has started by then it is cancelled and answered 503, and a client that
    disconnects cancels it too, so that a queued job is dropped instead of embedded for nobody.
    """

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(API_PATHS):
            await self.app(scope, receive, send)
            return
        admission = self.admission
        if path in SCENE_PATHS:
            scope.setdefault("state", {})["refused_route"] = path  # read by RequestMetrics if refused
        if admission.draining:
            exc = admission.refuse_draining()
            # Read to the end before closing: a socket closed with unread data resets the connection, and the
            # client would see a broken connection instead of this 503.
            await _discard_body(receive)
            await _send_json(send, 503, {"detail": exc.detail}, exc.headers)
            return
        now = time.monotonic()
        scene = path in SCENE_PATHS and scope["method"] == "POST"
        try:
            deadline = admission.deadline(_header(scope, _TIMEOUT_HEADER), now)
            if scene:
                admission.check_scene(deadline, now)
        except BadTimeout as exc:
            await _send_json(send, 400, {"detail": str(exc)}, keep_alive=True)
            return
        except Unavailable as exc:
            await _send_json(send, 503, {"detail": exc.detail}, exc.headers, keep_alive=True)
            return
        scope.setdefault("state", {})["deadline"] = deadline
        admission.begin(scene)
        pending = scene

        def answered() -> None:
            nonlocal pending
            if pending:
                pending = False
                admission.scene_answered()

        try:
            await self._bounded(scope, receive, send, deadline, answered)
        finally:
            answered()
            admission.end()

    async def _bounded(self, scope: Scope, receive: Receive, send: Send, deadline: float,
                       answered: Callable[[], None]) -> None:
        """The app, cancelled when the client goes away or when `deadline` passes before it answers;
        `answered` is called once its whole answer is sent."""
        loop = asyncio.get_running_loop()
        started = done = disconnected = False
        watcher: asyncio.Task | None = None

        async def watch() -> Message:
            nonlocal disconnected
            message = await receive()  # after the whole body: returns when the client goes (or the answer ends)
            if message["type"] == "http.disconnect" and not done:
                disconnected = True
                task.cancel()
            return message

        async def watched_receive() -> Message:
            nonlocal watcher
            if watcher is not None:  # the body is read: what comes next is the watcher's to see
                return await asyncio.shield(watcher)
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                watcher = loop.create_task(watch())
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started, done
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True
            await send(message)
            if done:
                answered()

        task = loop.create_task(self.app(scope, watched_receive, watched_send))
        try:
            finished, _ = await asyncio.wait((task,), timeout=max(0.0, deadline - time.monotonic()))
            if not finished and started:  # answering already: let it finish
                await asyncio.wait((task,))
            elif not finished:
                task.cancel()
                await asyncio.wait((task,))
                if not started:
                    self.admission.metrics.abandoned.labels(reason="timeout").inc()
                    await _send_json(send, 503, {"detail": "no answer within the request's timeout; retry later"},
                                     {"Retry-After": "1"}, keep_alive=True)
                return
            if task.cancelled() and disconnected:  # nobody to answer
                self.admission.metrics.abandoned.labels(reason="disconnect").inc()
                return
            task.result()  # the app's own exception, for the error middleware outside
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()


async def _discard_body(receive: Receive, limit: int = DISCARD_LIMIT_BYTES) -> None:
    received = 0
    while received <= limit:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        received += len(message.get("body", b""))


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value
    return None


async def _send_json(send: Send, status: int, body: dict, headers: dict[str, str] | None = None,
                     keep_alive: bool = False) -> None:
    payload = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    head += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    if not keep_alive:
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": payload})
