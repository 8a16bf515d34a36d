"""uvicorn with a drain: on SIGTERM (or Ctrl+C) stop admitting, answer what was admitted, then exit 0.

uvicorn's own shutdown closes the listening socket at once and then waits for open requests; a client
that connects meanwhile gets "connection refused", and an orchestrator still routing to us cannot tell
"gone" from "broken". So the first signal starts a drain instead (service/admission.py): the socket stays
open, `/readyz` answers 503 "draining", new API requests 503 with `Connection: close`, and the admitted
ones finish. Once none is in flight and no API request came for `QUIET_S` (or STL_DRAIN_S is spent),
uvicorn's shutdown runs with what is left of STL_DRAIN_S as its graceful timeout, then the lifespan
closes the engine. A second signal skips the rest of the drain; a third forces uvicorn to quit.

uvicorn re-raises a signal it handled once it has shut down, so the process would end "killed by
SIGTERM" (exit 143); a drained exit is a clean one, so the first signal is not handed to uvicorn.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

import uvicorn

from service.admission import Admission

LOG = logging.getLogger(__name__)

# How long the API must be idle before a drain ends early: a client answered just now may send its next
# request at once, and it should get a 503 rather than a refused connection.
QUIET_S = 0.5


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT drains `admission` before the usual shutdown."""

    def __init__(self, config: uvicorn.Config, admission: Admission) -> None:
        super().__init__(config)
        self.admission = admission
        self.signals = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals == 1 and not self.should_exit:
            LOG.info("%s received: draining", signal.Signals(sig).name)
            self.admission.start_drain()  # a flag and a log line: safe inside a signal handler
            return
        if self.signals == 2:
            self.should_exit = True
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.admission.draining and not self.should_exit and self.admission.drained(QUIET_S):
            self.config.timeout_graceful_shutdown = max(1, round(self.admission.drain_left_s()))
            self.should_exit = True
        return await super().on_tick(counter)


def serve(app, host: str, port: int, log_level: str, drain_s: float, keep_alive_s: float = 75.0) -> None:
    """Run `app` (built by service.app.create_app) until a signal has drained it.

    `keep_alive_s` must exceed the idle time after which clients and load balancers drop a connection
    themselves (httpx 5 s, AWS ALB 60 s): with uvicorn's own 5 s, a client reusing a connection idle for
    just under 5 s races the server's close, and its POST fails with a read error (12 of 47,892 requests
    of a 10-minute soak at c=32). 75 s is nginx's default."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=max(1, round(drain_s)), timeout_keep_alive=keep_alive_s)
    DrainingServer(config, app.state.admission).run()
