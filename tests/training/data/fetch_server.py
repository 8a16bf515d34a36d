"""A real HTTP image server on 127.0.0.1 for the fetcher's tests, with scripted faults per image id.

It serves generated JPEGs at the CDN layout `/<size>/<h[0:2]>/<h[2:4]>/<h[4:6]>/<h>.jpg` (any other path
is a 400, so a wrong URL scheme shows up as failures) and counts every request per id.
"""

from __future__ import annotations

import functools
import io
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

_PATH_RE = re.compile(r"^/(?P<size>[^/]+)/(?P<a>[^/]{2})/(?P<b>[^/]{2})/(?P<c>[^/]{2})/(?P<id>[^/]+)\.jpg$")

# Actions: "ok", an HTTP status as text ("403", "404", "500", "503"), "slow:<seconds>" (sleep, then ok),
# "truncate" (Content-Length larger than the body sent, then close), "garbage" (200 with a non-image body).


@functools.lru_cache(maxsize=4096)
def make_jpeg(image_id: str, size: tuple[int, int] = (24, 32)) -> bytes:
    seed = int(image_id[:6], 16) if re.fullmatch(r"[0-9a-f]{6}.*", image_id) else sum(image_id.encode())
    color = (seed & 255, (seed >> 8) & 255, (seed >> 16) & 255)
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class ImageServer:
    def __init__(self, size: str = "400x") -> None:
        self.size = size
        self.attempts: Counter[str] = Counter()
        self._scripts: dict[str, tuple[list[str], str]] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def set_fault(self, image_id: str, *first: str, then: str = "ok") -> None:
        """Answer the first requests for `image_id` with `first` (one action each), later ones with `then`."""
        with self._lock:
            self._scripts[image_id] = (list(first), then)

    def clear_faults(self) -> None:
        with self._lock:
            self._scripts.clear()

    def reset_counts(self) -> None:
        with self._lock:
            self.attempts.clear()

    def total_requests(self) -> int:
        with self._lock:
            return sum(self.attempts.values())

    def _next_action(self, image_id: str) -> str:
        with self._lock:
            number = self.attempts[image_id]
            self.attempts[image_id] += 1
            first, then = self._scripts.get(image_id, ([], "ok"))
            return first[number] if number < len(first) else then

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, body: bytes, content_length: int | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "image/jpeg" if status == 200 else "text/plain")
                self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                match = _PATH_RE.match(self.path)
                if match is None or match["size"] != server.size:
                    self._send(400, b"bad path")
                    return
                image_id = match["id"]
                if (match["a"], match["b"], match["c"]) != (image_id[0:2], image_id[2:4], image_id[4:6]):
                    self._send(400, b"hash folders do not match the id")
                    return
                action = server._next_action(image_id)
                body = make_jpeg(image_id)
                try:
                    if action == "ok":
                        self._send(200, body)
                    elif action.isdigit():
                        self._send(int(action), f"status {action}".encode())
                    elif action.startswith("slow:"):
                        time.sleep(float(action.split(":", 1)[1]))
                        self._send(200, body)
                    elif action == "truncate":
                        self._send(200, body[: len(body) // 2], content_length=len(body))
                    elif action == "garbage":
                        self._send(200, b"<html>not an image</html>")
                    else:
                        raise ValueError(f"unknown action {action!r}")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout); that is the point of the slow action

        return Handler
