"""What product data and filters cost `/recommend`: ids only vs product data + a filter, same vectors.

    .venv/bin/python benchmarks/bench_products.py [--rounds 4] [--c1-requests 30] [--c32-requests 200]

Two versions of the same 38,111-product artifact (the STL category mix, random unit vectors, the real
efficientnet_lite0 + head): one without a catalogue (answers carry ids only, as before), one with a
SQLite catalogue (title, brand, price, stock, labels; ~10 % out of stock). Two real uvicorn servers, one
per version, measured in alternating rounds (the shared cores drift within minutes): the plain one with
no filter, the catalogue one with `filter=colour=red` (~10 % of each category, plus the in-stock
default) and full product data in every item. Ratios of medians: c=1 p50 and c=32 throughput (target:
the extra fields and the filter cost <= 10 % throughput). Writes benchmarks/results/products.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from functools import partial  # noqa: E402

import bench_service as bench  # noqa: E402  (the same artifact, images, load generator and server start)

from index.catalogue import CatalogueRow  # noqa: E402
from index.edit import carry_export  # noqa: E402
from index.publish import publish, staging_dir  # noqa: E402
from index.writer import new_version, write_version  # noqa: E402
from training.data.products import Product  # noqa: E402
from training.model.checkpoint import load_embedder  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "products.json"
COLOURS = ("red", "blue", "black", "white", "green", "grey", "beige", "pink", "navy", "brown")


def catalogue_rows(categories: list, rng: np.random.Generator) -> list[CatalogueRow]:
    rows = []
    for data in categories:
        for row, pid in enumerate(data.ids):
            product = Product(pid, title=f"{COLOURS[row % 10].title()} item {pid}", brand=f"Brand {row % 20}",
                              price=round(float(np.exp(rng.normal(3.8, 0.6))), 2), currency="USD",
                              url=f"https://shop.example/p/{pid}", in_stock=bool(rng.random() >= 0.1),
                              labels={"colour": (COLOURS[int(rng.integers(0, 10))],), "pattern": ("solid",)})
            rows.append(CatalogueRow(product, data.category, row, int(rng.poisson(0.5))))
    return rows


def make_artifacts(work: Path, checkpoint: Path, embedder) -> tuple[Path, Path]:
    plain, rich = work / "plain", work / "rich"
    bench.make_artifact(plain, checkpoint, embedder)
    # The same categories, vectors and popularity, published again with a catalogue beside them.
    from index.artifact import open_artifact
    from index.writer import CategoryData

    artifact = open_artifact(plain)
    categories = [CategoryData(category, artifact.read_ids(category), artifact.read_vectors(category))
                  for category in artifact.categories]
    version = new_version("bench-products")
    staging = staging_dir(rich, version)
    export = artifact.manifest.export  # the same exported model, linked in as a derived version does
    write_version(staging, version, categories, embedder.fingerprint(), checkpoint, artifact.popularity,
                  artifact.products(), artifact.manifest.provenance,
                  catalogue=catalogue_rows(categories, np.random.default_rng(1)),
                  export=None if export is None else partial(carry_export, artifact, export))
    publish(rich, staging)
    return plain, rich


def bodies(url: str, images: list[bytes], filter_text: str | None, count: int = 40) -> list[tuple[str, bytes]]:
    categories = list(bench.STL_CATEGORY_MIX)
    made = []
    with httpx.Client(base_url=url) as client:
        for n in range(count):
            data = {"category": categories[n % len(categories)], "bbox": bench.BBOXES[n % len(bench.BBOXES)],
                    "k": "10"}
            if filter_text:
                data["filter"] = filter_text
            request = client.build_request("POST", "/recommend", data=data,
                                           files={"image": ("scene.jpg", images[n % len(images)], "image/jpeg")})
            made.append((request.headers["content-type"], request.read()))
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--c1-requests", type=int, default=30)
    parser.add_argument("--c32-requests", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    server_args = bench.get_args_parser().parse_args([])
    server_args.backbone_weights = None
    results: dict = {"rounds": []}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        checkpoint = bench.make_checkpoint(work / "head.pt")
        embedder = load_embedder(checkpoint, "cpu")
        plain, rich = make_artifacts(work, checkpoint, embedder)
        del embedder
        images = bench.scene_images(8)
        servers = []
        try:
            plain_server, plain_url = bench.start_server(plain, server_args)
            servers.append(plain_server)
            rich_server, rich_url = bench.start_server(rich, server_args)
            servers.append(rich_server)
            sample = httpx.post(f"{rich_url}/recommend", data={"category": "Shoes", "k": "3", "filter": "colour=red"},
                                files={"image": ("s.jpg", images[0], "image/jpeg")}).json()
            results["sample_item"] = sample["items"][0]
            loads = {"plain": (plain_url, bodies(plain_url, images, None)),
                     "products+filter": (rich_url, bodies(rich_url, images, "colour=red"))}
            for url, made in loads.values():  # warm-up
                bench.run_load(bench.load(url, made, 8, 40, args.seconds))
            for number in range(args.rounds):
                row: dict = {}
                for name, (url, made) in loads.items():
                    bench.settle()
                    one = bench.run_load(bench.load(url, made, 1, args.c1_requests, args.seconds))
                    bench.settle()
                    many = bench.run_load(bench.load(url, made, 32, args.c32_requests, args.seconds))
                    errors = len(one["errors"]) + len(many["errors"])
                    row[name] = {"c1_p50_ms": round(float(np.median(one["latencies"])) * 1000, 2),
                                 "c32_req_s": round(len(many["latencies"]) / many["wall"], 1), "errors": errors}
                row["c1_ratio"] = round(row["products+filter"]["c1_p50_ms"] / row["plain"]["c1_p50_ms"], 3)
                row["c32_ratio"] = round(row["products+filter"]["c32_req_s"] / row["plain"]["c32_req_s"], 3)
                print(f"round {number + 1}: {json.dumps(row)}", flush=True)
                results["rounds"].append(row)
        finally:
            for server in servers:
                server.terminate()
                server.wait(timeout=30)
    results["c1_p50_ratio_median"] = float(np.median([r["c1_ratio"] for r in results["rounds"]]))
    results["c32_throughput_ratio_median"] = float(np.median([r["c32_ratio"] for r in results["rounds"]]))
    results["errors"] = sum(r[name]["errors"] for r in results["rounds"] for name in ("plain", "products+filter"))
    ratio = results["c32_throughput_ratio_median"]
    print(f"c=1 p50 with products+filter / plain: {results['c1_p50_ratio_median']}x; c=32 throughput: {ratio}x "
          f"[target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'}]; errors {results['errors']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
