"""`python -m training evaluate-detector`: COCO mAP per category on the test split and, with --head, the
end-to-end HR@K with detected boxes next to HR@K with the given boxes. Writes OUT/detector_metrics.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from training.cli import report
from training.cli.args import (
    COUNT,
    add_cache_arg,
    add_data_arg,
    add_device_arg,
    add_progress_arg,
    add_split_seed_arg,
    directory,
    number,
)
from training.errors import TrainingError
from training.eval.detection import evaluate_detector


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training evaluate-detector",
                                     description="mAP@0.5 and mAP@0.5:0.95 per category on the test split, "
                                                 "and the end-to-end HR@K with a retrieval head")
    add_data_arg(parser)
    parser.add_argument("--detector", type=Path, required=True, help="detector checkpoint (detector.pt)")
    parser.add_argument("--head", type=Path, default=None, help="retrieval head checkpoint for the end-to-end HR@K")
    parser.add_argument("--out", type=directory, default=None, help="directory for detector_metrics.json")
    parser.add_argument("--k", type=COUNT, default=10, help="K of the end-to-end HR@K")
    parser.add_argument("--score-threshold", type=number(0.0, 1.0), default=0.05, help="lowest detection score kept")
    add_device_arg(parser)
    add_split_seed_arg(parser, help="seed of the scene split (as in train and evaluate)")
    add_cache_arg(parser, help="retrieval feature cache for product vectors (default: <data>/.cache/features)")
    add_progress_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        result = evaluate_detector(args.data, args.detector, head=args.head, out=args.out,
                                   split_seed=args.split_seed, device=args.device,
                                   score_threshold=args.score_threshold, k=args.k, cache=args.cache,
                                   progress=not args.no_progress)
    except TrainingError as exc:
        return report(exc)
    test = result["test"]
    print(f"test ({test['scenes']} scenes): mAP@0.5={test['map_50']:.3f} mAP@0.5:0.95={test['map_50_95']:.3f}")
    for category, values in test["per_category"].items():
        ap_50 = "-" if values["ap_50"] is None else f"{values['ap_50']:.3f}"
        ap = "-" if values["ap_50_95"] is None else f"{values['ap_50_95']:.3f}"
        print(f"  {category:<60} AP@0.5={ap_50:>6} AP@0.5:0.95={ap:>6} boxes={values['boxes']}")
    if "end_to_end" in result:
        e2e = result["end_to_end"]
        print(f"end-to-end HR@{e2e['k']} over {e2e['items']} items: detected boxes {e2e['hr_detected']:.3f}, "
              f"given boxes {e2e['hr_given']:.3f} (ratio {e2e['ratio']:.3f}; {e2e['found']} items found)")
    return 0
