"""`python -m training features`: extract and cache the frozen-backbone features of a dataset."""

from __future__ import annotations

import argparse
import json

from training.cli import report
from training.cli.args import (
    add_backbone_args,
    add_cache_arg,
    add_context_arg,
    add_data_arg,
    add_device_arg,
    add_engine_args,
    add_images_arg,
    add_progress_arg,
    add_workers_arg,
)
from training.errors import TrainingError
from training.exec.choose import open_executor
from training.fit.features import extract_features
from training.model.backbones import available


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training features",
                                     description="Frozen-backbone feature cache: every scene crop and product "
                                                 "image goes through the backbone once.")
    add_data_arg(parser)
    add_cache_arg(parser, required=True, help="feature cache root")
    add_backbone_args(parser, choices=available())
    add_context_arg(parser, help="fraction of the bbox's size added on each side of a scene crop")
    parser.add_argument("--jpeg-draft", action="store_true",
                        help="decode big JPEGs at reduced scale when the crop allows (faster, slightly "
                             "different pixels: part of the cache key)")
    parser.add_argument("--batch-size", type=int, default=64)
    add_workers_arg(parser, help="decoding worker processes (0: in process)")
    add_device_arg(parser)
    add_images_arg(parser)
    add_engine_args(parser)
    add_progress_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        with open_executor(args.engine, args.ray_address, args.workers) as executor:
            cached = extract_features(args.data, args.cache, args.backbone, args.backbone_weights, args.context,
                                      args.jpeg_draft, args.device, args.batch_size, args.workers,
                                      progress=not args.no_progress, executor=executor, images=args.images)
    except TrainingError as exc:
        return report(exc)
    print(json.dumps({
        "cache": str(cached.directory),
        "scene_crops": cached.n_scenes,
        "products": cached.n_products,
        "computed": cached.computed,
        "failed": len(cached.failed_scenes) + len(cached.failed_products),
    }, indent=2))
    return 0
