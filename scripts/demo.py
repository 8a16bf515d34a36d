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
from pathlib import Path

import httpx

from index import pipeline
from service.launch import ServiceNotReady, wait_until_ready
from training.data.stl import STLDataset


def get_args_parser() -> argparse.ArgumentParser:
    parser = pipeline.get_args_parser()
    parser.prog = "python scripts/demo.py"
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-serve", action="store_true", help="exit after the demo request")
    return parser


def demo_request(base_url: str, data: Path, seed: int, filter_text: str | None = None) -> dict:
    dataset = STLDataset.open(data, on_error="skip")
    pair = random.Random(seed).choice(dataset.pairs)
    category = dataset.categories.of(pair.product_id)
    bbox = ",".join(f"{value:.6f}" for value in pair.bbox)
    shown = f" filter={filter_text!r}" if filter_text else ""
    print(f"\nPOST {base_url}/recommend  scene={pair.scene_id} category={category!r} bbox={bbox} k=5{shown}")
    print(f"(the product actually in that box is {pair.product_id})")
    form = {"category": category, "bbox": bbox, "k": "5", **({"filter": filter_text} if filter_text else {})}
    with dataset.scene_path(pair.scene_id).open("rb") as image:
        response = httpx.post(
            f"{base_url}/recommend",
            files={"image": (f"{pair.scene_id}.jpg", image, "image/jpeg")},
            data=form,
            timeout=60.0,
        )
    response.raise_for_status()
    return response.json()


def print_answer(answer: dict) -> None:
    """The answer as a shopper would read it: rank, title, brand, price, score (and the raw JSON's head)."""
    print(f"source: {answer['source']}  index {answer['index_version']}  {answer['took_ms']:.1f} ms"
          + (f"  note: {answer['note']}" if answer.get("note") else ""))
    for item in answer["items"]:
        price = f"{item['price']:.2f} {item.get('currency') or ''}".strip() if item.get("price") is not None else "-"
        title = item.get("title") or item["product_id"]
        print(f"  #{item['rank']:<2} {title:<40.40} {item.get('brand') or '-':<18.18} {price:>12}  "
              f"score {item['score']:.3f}  ({item['product_id']})")


def demo_shop(base_url: str, data: Path, seed: int) -> None:
    """POST /shop with a catalogue scene holding several items; print each item found and its top-3 titles."""
    dataset = STLDataset.open(data, on_error="skip")
    items_of: dict[str, int] = {}
    for pair in dataset.pairs:
        items_of[pair.scene_id] = items_of.get(pair.scene_id, 0) + 1
    busiest = max(items_of.values())
    scenes = sorted(scene for scene, count in items_of.items() if count >= min(3, busiest))
    scene = random.Random(seed).choice(scenes)
    print(f"\nPOST {base_url}/shop  scene={scene} ({items_of[scene]} items in the catalogue's pairs) k=3")
    with dataset.scene_path(scene).open("rb") as image:
        response = httpx.post(f"{base_url}/shop", files={"image": (f"{scene}.jpg", image, "image/jpeg")},
                              data={"k": "3"}, timeout=60.0)
    if response.status_code == 503:
        print(f"/shop is not served by this version: {response.json().get('detail')}")
        return
    response.raise_for_status()
    answer = response.json()
    print(f"{len(answer['items'])} items found  index {answer['index_version']}  {answer['took_ms']:.1f} ms"
          + (f"  note: {answer['note']}" if answer.get("note") else ""))
    for item in answer["items"]:
        box = ",".join(f"{value:.3f}" for value in item["bbox"])
        print(f"  {item['category']:<50.50} box {box}  score {item['score']:.2f}  ({item['source']})")
        for product in item["products"][:3]:
            print(f"      #{product['rank']} {product.get('title') or product['product_id']}")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if pipeline.run(args):
        return 1
    base_url = f"http://{args.host}:{args.port}"
    env = {**os.environ, "STL_ARTIFACTS": str(args.artifacts.resolve()), "STL_DEVICE": args.device}
    print(f"\nstarting the service on {base_url} (Ctrl-C stops it)")
    server = subprocess.Popen([sys.executable, "-m", "service", "--host", args.host, "--port", str(args.port)], env=env)
    try:
        try:
            wait_until_ready(base_url, server, poll_s=0.5)
        except ServiceNotReady as exc:
            raise SystemExit(f"{exc}; see its log above") from None
        answer = demo_request(base_url, args.data, args.seed)
        print_answer(answer)
        print("first item as JSON:", json.dumps(answer["items"][0] if answer["items"] else None, indent=2))
        print_answer(demo_request(base_url, args.data, args.seed, "price<=60 AND in_stock=true"))
        demo_shop(base_url, args.data, args.seed)
        if args.no_serve:
            return 0
        print(f"\nserving on {base_url} — open {base_url}/ to shop the look (API docs at {base_url}/docs); "
              "Ctrl-C to stop")
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
