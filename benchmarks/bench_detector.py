"""Item detector: training time, per-image inference ms and test mAP at one or more input resolutions.

Trains `train-detector` on a synthetic STL catalogue (default: the `python -m training synth` one) for each
--sizes entry, times single-image `Detector.detect` on decoded test scenes, and evaluates mAP@0.5 and
mAP@0.5:0.95 on the test split through the real inference path (optionally the end-to-end HR@10 with
--head). Prints a table and writes benchmarks/results/detector.json.
TARGETS: test mAP@0.5 >= 0.8; end-to-end HR@10 with detected boxes >= 0.9x HR@10 with the given boxes.

    .venv/bin/python benchmarks/bench_detector.py --data data/synth [--sizes 320 416] [--head runs/x/head.pt]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from training.data.split import SPLIT_FRACTIONS, split_by_scene
from training.data.stl import STLDataset
from training.eval.detection import evaluate_detector
from training.fit.detector import DEFAULTS, DetectorFitOptions, fit_detector
from training.model.detector import load_detector
from training.model.preprocess import load_image

LOG = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_MAP_50 = 0.8
TARGET_E2E_RATIO = 0.9


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/synth"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_detector"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[DEFAULTS.image_size])
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument("--head", type=Path, default=None, help="retrieval head for the end-to-end HR@10")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--timing-images", type=int, default=30)
    parser.add_argument("--results", type=Path, default=RESULTS / "detector.json")
    return parser


def time_inference(checkpoint: Path, data: Path, device: str, images: int) -> dict:
    """Median and p90 ms of `detect([one image])` on decoded test scenes (decode not included)."""
    detector = load_detector(checkpoint, device=device)
    dataset = STLDataset.open(data, on_error="skip")
    scenes = list(dict.fromkeys(p.scene_id for p in split_by_scene(dataset.pairs, SPLIT_FRACTIONS).test))
    pictures = [load_image(dataset.scene_path(s)) for s in scenes[:images]]
    detector.detect(pictures[:1])  # warm-up
    times = []
    for picture in pictures:
        started = time.perf_counter()
        detector.detect([picture])
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))], "images": len(times)}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    runs = []
    for size in args.sizes:
        out = args.out / f"{size}px"
        options = DetectorFitOptions(image_size=size, epochs=args.epochs)
        fitted = fit_detector(args.data, out, options, cache=args.cache, device=args.device, workers=1,
                              progress=False)
        evaluation = evaluate_detector(args.data, fitted.path, head=args.head, out=out, device=args.device,
                                       progress=False)
        run = {"image_size": size, "epochs_run": len(fitted.log),
               "pyramid_seconds": fitted.metrics["seconds"]["pyramids"],
               "train_seconds": fitted.metrics["seconds"]["train"],
               "inference": time_inference(fitted.path, args.data, args.device, args.timing_images),
               "test": evaluation["test"]}
        if "end_to_end" in evaluation:
            run["end_to_end"] = evaluation["end_to_end"]
        runs.append(run)
    print(f"{'size':>5} {'train s':>8} {'pyr s':>7} {'ms/img':>7} {'mAP@.5':>7} {'mAP@.5:.95':>10} {'e2e ratio':>9}")
    for run in runs:
        ratio = run.get("end_to_end", {}).get("ratio")
        print(f"{run['image_size']:>5} {run['train_seconds']:>8.0f} {run['pyramid_seconds']:>7.0f} "
              f"{run['inference']['median_ms']:>7.1f} {run['test']['map_50']:>7.3f} {run['test']['map_50_95']:>10.3f} "
              f"{'-' if ratio is None else f'{ratio:.3f}':>9}")
    payload = {"data": str(args.data), "device": args.device, "threads": args.threads,
               "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
               "torch": torch.__version__, "targets": {"map_50": TARGET_MAP_50, "e2e_ratio": TARGET_E2E_RATIO},
               "runs": runs}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
