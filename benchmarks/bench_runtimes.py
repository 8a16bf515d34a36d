"""Runtimes for the exported embedder on a CPU: torch (traced + frozen, as `Embedder` runs it) against ONNX
Runtime and OpenVINO (f32, and bf16 where the CPU has it), real efficientnet_lite0 + a random 128-d head.

    python benchmarks/bench_runtimes.py                      # 2 threads, batch 1 and 8
    python benchmarks/bench_runtimes.py --threads 1 --runs 100

Each runtime runs in its own process, which loads only that runtime, so its RSS is what a service using it
would hold. Prints a table and writes benchmarks/results/runtimes.json (latencies are medians; the
accuracy columns compare each runtime's vectors with torch's on the same 8 preprocessed images).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

# Only torch-free modules at the top: a worker process for onnxruntime / openvino must never load torch,
# or its RSS would not be the service's. The parent's torch imports live in `_prepare`.
from training.model.arrays import to_array
from training.model.runtimes import load_runtime

DEFAULT_OUT = Path(__file__).parent / "results" / "runtimes.json"
BATCHES = (1, 8)
IMAGE_SIZE = 224
HEAD_FILE = "head.pt"
EXPORT_DIR = "export"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=40, help="timed calls at batch 1 (a quarter of it at 8)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--workdir", type=Path, default=None, help="where the export goes (default: a temp dir)")
    parser.add_argument("--worker", nargs=2, metavar=("RUNTIME", "PRECISION"), help=argparse.SUPPRESS)
    return parser


def _photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields plus grain: closer to a photo's statistics than noise (matters for bf16 error)."""
    coarse = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, smooth.shape, dtype=np.int16)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def _inputs(count: int = max(BATCHES)) -> np.ndarray:
    rng = np.random.default_rng(0)
    spec = SimpleNamespace(image_size=IMAGE_SIZE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), context=0.1)
    boxes = [None, (0.1, 0.2, 0.6, 0.9)]
    return np.stack([to_array(_photo_like(rng, 320, 400), boxes[index % 2], spec) for index in range(count)])


def _rss_mib() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def _prepare(workdir: Path) -> None:
    """Export lite0 + a seeded random head (BatchNorm stats randomised too) and save the head for torch."""
    import torch

    from training.model.backbones import load_backbone
    from training.model.embedder import Embedder
    from training.model.export import export_embedder
    from training.model.head import CompatibilityHead, HeadConfig

    backbone = load_backbone("efficientnet_lite0")
    torch.manual_seed(0)
    head = CompatibilityHead(HeadConfig(in_dim=backbone.dim, out_dim=128))
    head.scene.layers[1].running_mean.uniform_(-0.5, 0.5)
    head.scene.layers[1].running_var.uniform_(0.5, 2.0)
    torch.save(head.state_dict(), workdir / HEAD_FILE)
    export_embedder(Embedder(backbone, head, device="cpu", freeze=False), workdir / EXPORT_DIR)


def _torch_runtime(workdir: Path, threads: int):
    import torch

    from training.model.backbones import load_backbone
    from training.model.embedder import Embedder
    from training.model.head import CompatibilityHead, HeadConfig

    backbone = load_backbone("efficientnet_lite0")
    head = CompatibilityHead(HeadConfig(in_dim=backbone.dim, out_dim=128))
    head.load_state_dict(torch.load(workdir / HEAD_FILE, weights_only=True))
    return load_runtime("torch", embedder=Embedder(backbone, head, device="cpu"), threads=threads)


def _median_ms(call, batch: np.ndarray, runs: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        call(batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call(batch)
        times.append((time.perf_counter() - start) * 1000)
    return {"median": round(float(np.median(times)), 2), "min": round(float(np.min(times)), 2)}


def run_worker(name: str, precision: str, workdir: Path, threads: int, runs: int, warmup: int) -> dict:
    """One runtime in this process: load time, latency at each batch, RSS after warm-up, its vectors."""
    start = time.perf_counter()
    if name == "torch":
        runtime = _torch_runtime(workdir, threads)
    else:
        runtime = load_runtime(name, workdir / EXPORT_DIR, precision=precision, threads=threads)
    load_s = time.perf_counter() - start
    images = _inputs()
    vectors = lambda batch: runtime.vectors(batch, "scene")  # noqa: E731
    latency = {
        str(size): _median_ms(vectors, images[:size], runs if size == 1 else max(5, runs // 4), warmup)
        for size in BATCHES
    }
    np.save(workdir / f"vectors-{name}-{precision}.npy", vectors(images))
    return {"runtime": name, "precision": precision, "load_s": round(load_s, 2), "ms": latency,
            "rss_mib": _rss_mib(), "torch_loaded": "torch" in sys.modules}


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _configs() -> list[tuple[str, str]]:
    from training.model.runtimes.openvino_runtime import cpu_supports_bf16

    configs = [("torch", "f32"), ("onnxruntime", "f32"), ("openvino", "f32")]
    return configs + [("openvino", "bf16")] if cpu_supports_bf16() else configs


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if args.worker:
        name, precision = args.worker
        print(json.dumps(run_worker(name, precision, args.workdir, args.threads, args.runs, args.warmup)))
        return {}
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as temp:
        workdir = args.workdir or Path(temp)
        workdir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        _prepare(workdir)
        export_s = time.perf_counter() - start
        load_before = os.getloadavg()
        rows = []
        for name, precision in _configs():
            command = [sys.executable, __file__, "--worker", name, precision, "--workdir", str(workdir),
                       "--threads", str(args.threads), "--runs", str(args.runs), "--warmup", str(args.warmup)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        reference = np.load(workdir / "vectors-torch-f32.npy")
        for row in rows:
            vectors = np.load(workdir / f"vectors-{row['runtime']}-{row['precision']}.npy")
            cosines = np.sum(vectors * reference, axis=1) / (
                np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))
            row["max_abs_diff"] = float(np.abs(vectors - reference).max())
            row["min_cosine"] = float(cosines.min())
    result = {
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": [round(value, 2) for value in load_before],
                    "load_average_after": [round(value, 2) for value in os.getloadavg()]},
        "threads": args.threads, "runs": args.runs, "export_s": round(export_s, 1), "rows": rows,
    }
    print(f"{'runtime':<12} {'prec':<5} {'b1 ms':>7} {'b8 ms':>7} {'b1 min':>7} {'b8 min':>7} "
          f"{'RSS MiB':>8} {'load s':>6} {'max|diff|':>10} {'min cos':>10} torch")
    for row in rows:
        print(f"{row['runtime']:<12} {row['precision']:<5} {row['ms']['1']['median']:>7.2f} "
              f"{row['ms']['8']['median']:>7.2f} {row['ms']['1']['min']:>7.2f} {row['ms']['8']['min']:>7.2f} "
              f"{row['rss_mib']['VmRSS']:>8.1f} {row['load_s']:>6.2f} {row['max_abs_diff']:>10.2e} "
              f"{row['min_cosine']:>10.7f} {'yes' if row['torch_loaded'] else 'no'}")
    print(f"load average before/after: {result['machine']['load_average_before']} / "
          f"{result['machine']['load_average_after']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
