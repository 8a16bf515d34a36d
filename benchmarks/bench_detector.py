"""Item detector: training time, test mAP per category and per-image inference at one or more resolutions.

For each --sizes x --fpn-channels entry: trains `train-detector` on a synthetic STL catalogue (default: the
`python -m training synth` one), evaluates mAP@0.5 and mAP@0.5:0.95 per category on the test split through
`Detector.detect` (and, with --head, the end-to-end HR@10 with detected vs given boxes), exports the ONNX
graph the service runs and evaluates the test mAP again through it in OpenVINO, in f32 and (on a CPU with
AVX-512 BF16 / AMX) bf16. Then the timing phase: every run's graph, in each precision, on one photo at a
time (what /shop sends), timed round-robin in one loop so that the ratios between runs hold on a shared
machine; torch's `Detector.detect` is timed the same way. Prints tables and writes
benchmarks/results/detector.json.

TARGETS: test mAP@0.5 >= 0.8; end-to-end HR@10 with detected boxes >= 0.9x HR@10 with the given boxes.

    .venv/bin/python benchmarks/bench_detector.py --data data/synth [--sizes 320 416 512] [--epochs 12]
        [--fpn-channels 64 32] [--head runs/x/head.pt] [--out runs/bench_detector] [--cache DIR]

A run whose OUT/<size>px-c<channels>/detector.pt was trained with the same options on the same data is
reused (its recorded training time is reported), so a timing phase can be re-run without training again.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.data.split import SPLIT_FRACTIONS, split_by_scene
from training.data.stl import STLDataset, dataset_fingerprint
from training.errors import TrainingError
from training.eval.detection import coco_map, evaluate_detector, scene_truths
from training.fit.detector import DEFAULTS, LOG_FILE, DetectorFitOptions, fit_detector
from training.model.detect_post import DetectorGraph
from training.model.detector import (
    DetectorMismatch,
    check_detector_export,
    export_detector,
    load_detector,
    read_detector_checkpoint,
)
from training.model.preprocess import load_image
from training.model.runtimes import installed
from training.model.runtimes.openvino_runtime import cpu_supports_bf16

LOG = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_MAP_50 = 0.8
TARGET_E2E_RATIO = 0.9
# The service's /shop thresholds (STL_DETECT_*): what the "with decoding" timing decodes with.
SERVE_SCORE, SERVE_NMS, SERVE_ITEMS = 0.5, 0.6, 10
EARRINGS = "Apparel & Accessories|Jewelry|Earrings"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/synth"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_detector"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[DEFAULTS.image_size])
    parser.add_argument("--fpn-channels", type=int, nargs="+", default=[DEFAULTS.fpn_channels])
    parser.add_argument("--head-convs", type=int, default=DEFAULTS.head_convs)
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument("--head", type=Path, default=None, help="retrieval head for the end-to-end HR@10")
    parser.add_argument("--cache", type=Path, default=None, help="pyramid cache (default <data>/.cache/pyramids)")
    parser.add_argument("--feature-cache", type=Path, default=None,
                        help="retrieval feature cache for the end-to-end HR@10 (default <data>/.cache/features)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for training and torch inference (1 is fastest on a shared 2-core "
                             "machine)")
    parser.add_argument("--runtime-threads", type=int, default=os.cpu_count() or 1,
                        help="OpenVINO threads of the timed graphs (the service's STL_RUNTIME_THREADS: every core)")
    parser.add_argument("--timing-images", type=int, default=30)
    parser.add_argument("--timing-rounds", type=int, default=3, help="round-robin passes over the timing images")
    parser.add_argument("--no-train", action="store_true", help="only reuse runs trained before; skip the others")
    parser.add_argument("--results", type=Path, default=RESULTS / "detector.json")
    return parser


@dataclass(frozen=True)
class Variant:
    image_size: int
    fpn_channels: int
    head_convs: int

    @property
    def name(self) -> str:
        return f"{self.image_size}px-c{self.fpn_channels}" + (f"-h{self.head_convs}" if self.head_convs != 2 else "")


def _load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def _precisions() -> list[str]:
    if not installed("openvino"):
        return []
    return ["f32", "bf16"] if cpu_supports_bf16() else ["f32"]


def _reusable(path: Path, options: DetectorFitOptions, data: Path) -> bool:
    if not path.is_file():
        return False
    try:
        checkpoint = read_detector_checkpoint(path)
    except (DetectorMismatch, TrainingError):
        return False
    return checkpoint.train_config == options.to_dict() and checkpoint.data_fingerprint == dataset_fingerprint(data)


def _test_pictures(data: Path) -> tuple[STLDataset, list, list[Image.Image]]:
    dataset = STLDataset.open(data, on_error="skip")
    truths = scene_truths(dataset, split_by_scene(dataset.pairs, SPLIT_FRACTIONS).test)
    return dataset, truths, [load_image(dataset.scene_path(t.scene_id)) for t in truths]


def graph_map(graph: DetectorGraph, truths: list, pictures: list[Image.Image]) -> dict:
    """Test mAP through the exported graph, one photo at a time (the service's path), as evaluate-detector."""
    predictions = [graph.detect([picture], score_threshold=0.05, max_detections=100)[0] for picture in pictures]
    return coco_map(truths, predictions, graph.categories).to_dict()


def train_and_evaluate(args: argparse.Namespace, variant: Variant, truths: list,
                       pictures: list[Image.Image]) -> dict | None:
    out = args.out / variant.name
    options = DetectorFitOptions(image_size=variant.image_size, fpn_channels=variant.fpn_channels,
                                 head_convs=variant.head_convs, epochs=args.epochs)
    checkpoint = out / "detector.pt"
    load_before = _load()
    if _reusable(checkpoint, options, args.data):
        LOG.info("%s: reusing %s", variant.name, checkpoint)
        log = json.loads((out / LOG_FILE).read_text(encoding="utf-8"))
        seconds, epochs_run = log["metrics"]["seconds"], len(log["epochs"])
    elif args.no_train:
        LOG.warning("%s: no reusable checkpoint in %s; skipped (--no-train)", variant.name, out)
        return None
    else:
        fitted = fit_detector(args.data, out, options, cache=args.cache, device=args.device, workers=1,
                              progress=False)
        seconds, epochs_run = fitted.metrics["seconds"], len(fitted.log)
    load_trained = _load()
    evaluation = evaluate_detector(args.data, checkpoint, head=args.head, out=out, device=args.device,
                                   cache=args.feature_cache, progress=False)
    detector = load_detector(checkpoint, device="cpu")
    export_dir = out / "export"
    export_detector(detector, checkpoint, export_dir)
    max_diff = check_detector_export(detector, export_dir, "openvino" if installed("openvino") else "auto")
    graph_test = {precision: graph_map(DetectorGraph(export_dir, "openvino", args.runtime_threads,
                                                     precision=precision), truths, pictures)
                  for precision in _precisions()}
    run = {"name": variant.name, "image_size": variant.image_size, "fpn_channels": variant.fpn_channels,
           "head_convs": variant.head_convs, "epochs": args.epochs, "epochs_run": epochs_run,
           "pyramid_seconds": seconds["pyramids"], "train_seconds": seconds["train"],
           "load_average": {"before": load_before, "after_training": load_trained, "after_eval": _load()},
           "test": evaluation["test"], "graph_test": graph_test, "export_max_abs_diff": max_diff,
           "export_dir": str(export_dir), "checkpoint": str(checkpoint)}
    if "end_to_end" in evaluation:
        run["end_to_end"] = evaluation["end_to_end"]
    return run


def time_runs(args: argparse.Namespace, runs: list[dict], pictures: list[Image.Image]) -> dict:
    """Per run and precision: median ms of the graph on one photo, and of to_array + graph + decoding at the
    service's thresholds; torch's `Detector.detect` too. Round-robin, so every run sees the same load."""
    photos = pictures[:args.timing_images]
    timers: dict[tuple[str, str], tuple] = {}
    for run in runs:
        for precision in _precisions():
            graph = DetectorGraph(run["export_dir"], "openvino", args.runtime_threads, precision=precision)
            arrays = [graph.to_array(photo)[None] for photo in photos]
            graph.raw(arrays[0])
            timers[(run["name"], precision)] = (graph, arrays)
        detector = load_detector(run["checkpoint"], device="cpu")
        detector.detect(photos[:1])
        timers[(run["name"], "torch")] = (detector, None)
    times: dict[tuple[str, str], dict[str, list[float]]] = {key: {"graph": [], "detect": []} for key in timers}
    load_before = _load()
    for _ in range(args.timing_rounds):
        for index, photo in enumerate(photos):
            for key, (model, arrays) in timers.items():
                if arrays is None:  # torch
                    started = time.perf_counter()
                    model.detect([photo], SERVE_SCORE, SERVE_NMS, SERVE_ITEMS)
                    times[key]["detect"].append((time.perf_counter() - started) * 1000)
                    continue
                started = time.perf_counter()
                model.raw(arrays[index])
                times[key]["graph"].append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                model.detect([photo], SERVE_SCORE, SERVE_NMS, SERVE_ITEMS)
                times[key]["detect"].append((time.perf_counter() - started) * 1000)
    timing: dict = {"images": len(photos), "rounds": args.timing_rounds, "runtime_threads": args.runtime_threads,
                    "torch_threads": torch.get_num_threads(), "load_average": {"before": load_before,
                                                                                "after": _load()}, "ms": {}}
    for (name, precision), measured in times.items():
        timing["ms"].setdefault(name, {})[precision] = {
            part: {"p50": statistics.median(values), "p90": float(np.percentile(values, 90))}
            for part, values in measured.items() if values}
    return timing


def _ap(metrics: dict, category: str) -> str:
    value = metrics["per_category"].get(category, {}).get("ap_50")
    return "-" if value is None else f"{value:.3f}"


def print_tables(runs: list[dict], timing: dict) -> None:
    base = runs[0]["name"]
    print(f"\n{'run':<14} {'train s':>8} {'pyr s':>6} {'mAP@.5':>7} {'@.5:.95':>8} {'earrings':>8} "
          f"{'e2e ratio':>9} {'graph f32 mAP@.5':>16} {'graph bf16 mAP@.5':>17}")
    for run in runs:
        ratio = run.get("end_to_end", {}).get("ratio")
        graph = run["graph_test"]
        print(f"{run['name']:<14} {run['train_seconds']:>8.0f} {run['pyramid_seconds']:>6.0f} "
              f"{run['test']['map_50']:>7.3f} {run['test']['map_50_95']:>8.3f} {_ap(run['test'], EARRINGS):>8} "
              f"{'-' if ratio is None else f'{ratio:.3f}':>9} "
              f"{graph['f32']['map_50'] if 'f32' in graph else float('nan'):>16.3f} "
              f"{graph['bf16']['map_50'] if 'bf16' in graph else float('nan'):>17.3f}")
    categories = sorted(runs[0]["test"]["per_category"])
    print(f"\nAP@0.5 per category (torch path)\n{'category':<28}" + "".join(f"{run['name']:>14}" for run in runs))
    for category in categories:
        print(f"{category.split('|')[-1][:27]:<28}" + "".join(f"{_ap(run['test'], category):>14}" for run in runs))
    print(f"\nms per photo, median (load {timing['load_average']}); x = ratio to {base} in the same precision")
    print(f"{'run':<14} " + " ".join(f"{label:>22}" for label in ("f32 graph", "f32 +pre/post", "bf16 graph",
                                                                   "bf16 +pre/post", "torch detect")))
    ms = timing["ms"]
    for run in runs:
        cells = []
        for precision, part in (("f32", "graph"), ("f32", "detect"), ("bf16", "graph"), ("bf16", "detect"),
                                ("torch", "detect")):
            value = ms[run["name"]].get(precision, {}).get(part, {}).get("p50")
            reference = ms[base].get(precision, {}).get(part, {}).get("p50")
            cells.append("-" if value is None else f"{value:.1f} ({value / reference:.2f}x)")
        print(f"{run['name']:<14} " + " ".join(f"{cell:>22}" for cell in cells))


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    _, truths, pictures = _test_pictures(args.data)
    runs = []
    for size in args.sizes:
        for channels in args.fpn_channels:
            run = train_and_evaluate(args, Variant(size, channels, args.head_convs), truths, pictures)
            if run is not None:
                runs.append(run)
    if not runs:
        print("nothing to measure", file=sys.stderr)
        return 1
    timing = time_runs(args, runs, pictures)
    payload = {"data": str(args.data), "device": args.device, "threads": args.threads,
               "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
               "torch": torch.__version__, "targets": {"map_50": TARGET_MAP_50, "e2e_ratio": TARGET_E2E_RATIO},
               "precisions": _precisions(), "seconds": time.perf_counter() - started,
               "note": "a shared 2-core machine: compare the ratios within one run, not absolute times",
               "runs": runs, "timing": timing}
    # Written before anything else: a process holding torch's and OpenVINO's thread pools has crashed at exit
    # (SIGSEGV, see DEVELOPERS.md), and an hour of training should not be lost to it.
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(payload, indent=2) + "\n")
    print_tables(runs, timing)
    print(f"wrote {args.results}", flush=True)
    passed = all(run["test"]["map_50"] >= TARGET_MAP_50 and run.get("end_to_end", {}).get("ratio", 1.0)
                 >= TARGET_E2E_RATIO for run in runs)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
