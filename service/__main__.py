"""`python -m service [--host H] [--port P]`: serve the API with uvicorn (configuration from STL_* env)."""

from __future__ import annotations

import argparse
import logging
import sys

# First, before anything imports torch: libgomp reads GOMP_SPINCOUNT once, when torch is first imported
# (service/process.py says why and what it measured). Nothing heavy is imported above this line.
from service import process

process.default_openmp_spin()

from pydantic import ValidationError  # noqa: E402

from service.settings import Settings, get_settings  # noqa: E402

LOG = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", default=None, help="interface to listen on (default STL_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default STL_PORT or 8000; 0 = any free)")
    parser.add_argument("--log-level", default=None, help="overrides STL_LOG_LEVEL")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        settings = get_settings()
        overrides = {name: value for name, value in (("host", args.host), ("port", args.port),
                                                        ("log_level", args.log_level)) if value is not None}
        settings = Settings.model_validate({**settings.model_dump(), **overrides}) if overrides else settings
    except ValidationError as exc:
        print(f"invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    from service.access import AccessError
    from service.app import create_app
    from service.server import serve
    from training.model.runtimes import RuntimeUnavailable

    # Steady forward passes without page faults (service/process.py): 71-74 -> 88-96 req/s at
    # concurrency 32 on 2 cores, for the server starts that used to land in glibc's slow state.
    process.retain_freed_memory()

    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(settings)
    except (AccessError, RuntimeUnavailable) as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 2
    # Exits 0 after a SIGTERM once what was admitted is answered (service/server.py).
    serve(app, settings.host, settings.port, settings.log_level.lower(), settings.drain_s, settings.keep_alive_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
