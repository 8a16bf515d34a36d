"""`make demo`: build everything on the synthetic catalogue, serve it on 127.0.0.1, ask it once, keep serving.

Re-running reuses the catalogue, the trained head and the published index when they are already there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

from index import pipeline
from training.stl import STLDataset


def get_args_parser() -> argparse.ArgumentParser:
    parser = pipeline.get_args_parser()
    parser.prog = "python scripts/demo.py"
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-serve", action="store_true", help="exit after the demo request")
    return parser


def wait_ready(base_url: str, server: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the service exited with code {server.returncode}; see its log above")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the service was not ready after {timeout_s:.0f} s")


def demo_request(base_url: str, data: Path, seed: int) -> dict:
    dataset = STLDataset.open(data, on_error="skip")
    pair = random.Random(seed).choice(dataset.pairs)
    category = dataset.categories.of(pair.product_id)
    bbox = ",".join(f"{value:.6f}" for value in pair.bbox)
    print(f"\nPOST {base_url}/recommend  scene={pair.scene_id} category={category!r} bbox={bbox} k=5")
    print(f"(the product actually in that box is {pair.product_id})")
    with dataset.scene_path(pair.scene_id).open("rb") as image:
        response = httpx.post(
            f"{base_url}/recommend",
            files={"image": (f"{pair.scene_id}.jpg", image, "image/jpeg")},
            data={"category": category, "bbox": bbox, "k": "5"},
            timeout=60.0,
        )
    response.raise_for_status()
    return response.json()


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if pipeline.run(args):
        return 1
    base_url = f"http://{args.host}:{args.port}"
    env = {**os.environ, "STL_ARTIFACTS": str(args.artifacts.resolve()), "STL_DEVICE": args.device}
    print(f"\nstarting the service on {base_url} (Ctrl-C stops it)")
    server = subprocess.Popen([sys.executable, "-m", "service", "--host", args.host, "--port", str(args.port)], env=env)
    try:
        wait_ready(base_url, server)
        print(json.dumps(demo_request(base_url, args.data, args.seed), indent=2))
        if args.no_serve:
            return 0
        print(f"\nserving on {base_url} — try {base_url}/docs ; Ctrl-C to stop")
        server.wait()
        return server.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
