"""`python -m index pipeline`: catalogue -> trained head (and item detector) -> published index, each step
skipped when done.

The demo (`make demo`) and the docker `indexer` job both run this. It makes the synthetic catalogue
only when the data directory holds no STL data, so a user's mounted real dataset is used as it is.
The item detector (for /detect and /shop) trains on the same scenes, a few epochs by default (the synthetic
catalogue reaches val mAP@0.5 ~0.90 after 3 epochs at 320 px), its pyramids in the same cache directory;
`--no-detector` skips it.

`--engine ray` (with `--ray-address` or RAY_ADDRESS: the docker `cluster` profile) runs the head's feature
extraction, the catalogue's embedding and the per-category index builds on a Ray cluster; this process still
trains and publishes. Nothing connects to Ray until a step needs it, so a rerun with every step done needs no
cluster.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from index.artifact import current_version, open_artifact
from index.build import build
from index.errors import ArtifactError
from training.cli import report
from training.cli.args import COUNT, SEED, add_backbone_args, add_device_arg, add_engine_args, directory
from training.data.stl import PAIRS_FILE, UPSTREAM_PAIRS_FILES
from training.data.synth import SynthConfig, generate, load_category_counts
from training.errors import TrainingError
from training.exec.choose import open_executor
from training.exec.executor import Executor
from training.fit.detector import CHECKPOINT_FILE as DETECTOR_FILE
from training.fit.detector import DetectorFitOptions, fit_detector
from training.fit.run import HEAD_FILE, FitOptions, fit_head
from training.io import file_sha256
from training.model.detect_post import CHECKPOINT_FILE as DETECTOR_ARTIFACT_FILE

LOG = logging.getLogger(__name__)

DETECTOR_EPOCHS = 4


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m index pipeline", description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/synth"), help="STL dataset directory")
    parser.add_argument("--work", type=directory, default=Path("runs/demo"), help="feature cache and head checkpoint")
    parser.add_argument("--artifacts", type=directory, default=Path("artifacts"), help="index artifacts root")
    parser.add_argument("--scenes", type=int, default=None, help="synthetic scenes (generator default if unset)")
    parser.add_argument("--products", type=int, default=None, help="synthetic products (generator default if unset)")
    parser.add_argument("--seed", type=SEED, default=0)
    add_backbone_args(parser, weights=False)
    add_device_arg(parser, strict=True)
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (trainer default if unset)")
    parser.add_argument("--no-detector", dest="detector", action="store_false",
                        help="train no item detector: the version then serves no /detect and /shop")
    parser.add_argument("--detector-epochs", type=COUNT, default=DETECTOR_EPOCHS,
                        help=f"item detector training epochs (default {DETECTOR_EPOCHS})")
    parser.add_argument("--detector-size", type=int, default=None,
                        help="item detector input size in pixels (the detector's default if unset)")
    add_engine_args(parser, what="the feature extraction, the catalogue embedding and the index builds")
    return parser


def has_stl_data(data: Path) -> bool:
    return any((data / name).is_file() for name in (PAIRS_FILE, *UPSTREAM_PAIRS_FILES))


def published_head_sha256(artifacts: Path) -> str | None:
    """sha256 of the head checkpoint the current version serves; None when nothing (readable) is published."""
    return published_models(artifacts)[0]


def published_models(artifacts: Path) -> tuple[str | None, str | None]:
    """sha256s of the head and of the detector checkpoint the current version serves (None: none, or unreadable)."""
    if current_version(artifacts) is None:
        return None, None
    try:
        artifact = open_artifact(artifacts)
        head = file_sha256(artifact.checkpoint_path)
    except (ArtifactError, OSError):
        return None, None
    record = artifact.manifest.detector
    return head, None if record is None else record.files.get(DETECTOR_ARTIFACT_FILE)


def main(argv: list[str] | None = None) -> int:
    return run(get_args_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the steps that are not done yet; `args` as parsed by `get_args_parser()`."""
    try:
        return _run(args)
    except (TrainingError, ArtifactError) as exc:
        return report(exc)


def _run(args: argparse.Namespace) -> int:
    with open_executor(args.engine, args.ray_address, _workers()) as executor:
        return _steps(args, executor)


def _workers() -> int:
    return min(2, os.cpu_count() or 1)


def _steps(args: argparse.Namespace, executor: Executor) -> int:
    if has_stl_data(args.data):
        print(f"[1/3] dataset: using {args.data}")
    else:
        print(f"[1/3] dataset: generating the synthetic catalogue in {args.data}")
        sizes = {name: value for name, value in (("scenes", args.scenes), ("products", args.products))
                 if value is not None}
        config = SynthConfig(seed=args.seed, categories=load_category_counts(), **sizes)
        generate(args.data, config, workers=_workers(), progress=True)

    model_dir = args.work / "model"
    head = model_dir / HEAD_FILE
    if head.is_file():
        print(f"[2/3] model: using {head}")
    else:
        print(f"[2/3] model: training the head into {model_dir}")
        options = FitOptions(backbone=args.backbone, seed=args.seed,
                             **({"epochs": args.epochs} if args.epochs is not None else {}))
        fit_head(args.data, model_dir, options, cache=args.work / "cache", device=args.device, workers=_workers(),
                 executor=executor)

    detector = _detector(args) if args.detector else None
    wanted = (file_sha256(head), None if detector is None else file_sha256(detector))
    if published_models(args.artifacts) == wanted:
        print(f"[3/3] index: {args.artifacts / 'current'} already serves this model")
        return 0
    print(f"[3/3] index: building and publishing into {args.artifacts}")
    version = build(data=args.data, checkpoint=head, out=args.artifacts, device=args.device,
                    cache=args.work / "cache", workers=_workers(), detector=detector, executor=executor)
    print(f"published {version} under {args.artifacts}")
    return 0


def _detector(args: argparse.Namespace) -> Path:
    """The item detector's checkpoint, trained unless the work directory holds one."""
    detector_dir = args.work / "detector"
    checkpoint = detector_dir / DETECTOR_FILE
    if checkpoint.is_file():
        print(f"[2/3] detector: using {checkpoint}")
        return checkpoint
    print(f"[2/3] detector: training the item detector into {detector_dir} ({args.detector_epochs} epochs)")
    options = DetectorFitOptions(backbone=args.backbone, seed=args.seed, epochs=args.detector_epochs,
                                 patience=args.detector_epochs,
                                 **({"image_size": args.detector_size} if args.detector_size else {}))
    fitted = fit_detector(args.data, detector_dir, options, cache=args.work / "cache", device=args.device,
                          workers=_workers())
    print(f"detector: val mAP@0.5 {fitted.metrics.get('val', {}).get('map_50', float('nan')):.3f} "
          f"in {fitted.seconds:.0f} s")
    return checkpoint


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main())
