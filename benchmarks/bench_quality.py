"""Quality of the trained head against popularity and the raw-backbone kNN on the synthetic catalogue.

Generates the default synthetic catalogue if missing (training.data.synth), trains the head with the default
backbone (`python -m training train`), then ranks every test pair against all products of its category:
HR@{1,5,10,20,50}, binary accuracy, AUC and run times, plus the head's ratios to the baselines.
Prints a table and writes benchmarks/results/bench_quality.json.

TARGET: head HR@10 >= 2x popularity and >= 1.5x raw kNN, binary accuracy >= 0.9, above popularity at
every K <= 50.

    .venv/bin/python benchmarks/bench_quality.py [--data data/synth] [--run runs/bench_quality] [-- train args]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from training.cli import synth, train
from training.data.popularity import Popularity
from training.data.split import split_by_scene
from training.data.stl import STLDataset
from training.eval.rankers import EmbeddingRanker, PopularityRanker, evaluate_models, format_table
from training.fit.features import cache_features
from training.fit.run import CONFIG_FILE, HEAD_FILE, LOG_FILE
from training.model.backbones import load_backbone
from training.model.checkpoint import load_embedder
from training.model.embedder import Embedder

LOG = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KS = (1, 5, 10, 20, 50)
TARGETS = {"hr10_vs_popularity": 2.0, "hr10_vs_knn": 1.5, "binary_accuracy": 0.9}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synth", help="synthetic catalogue directory")
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench_quality", help="training output dir")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="retrain even when the run's head.pt is up to date")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_quality.json")
    parser.add_argument("train_args", nargs="*", help="extra `python -m training train` arguments (after --)")
    return parser


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    times: dict[str, float] = {}

    if not (args.data / "pairs.jsonl").is_file():
        started = time.perf_counter()
        if synth.main(["--out", str(args.data), "--no-progress"]) != 0:
            print(f"error: could not generate the synthetic catalogue in {args.data}", file=sys.stderr)
            return 1
        times["synth_seconds"] = round(time.perf_counter() - started, 2)

    started = time.perf_counter()
    train_argv = ["--data", str(args.data), "--out", str(args.run), "--backbone", args.backbone,
                  "--device", args.device, "--split-seed", str(args.split_seed), "--no-progress", *args.train_args]
    if train.main(train_argv + (["--force"] if args.force else [])) != 0:
        return 1
    times["train_command_seconds"] = round(time.perf_counter() - started, 2)
    log = json.loads((args.run / LOG_FILE).read_text(encoding="utf-8"))

    dataset = STLDataset.open(args.data)
    split = split_by_scene(dataset.pairs, seed=args.split_seed)
    popularity = Popularity.from_pairs(split.train, dataset.categories)
    head_embedder = load_embedder(args.run / HEAD_FILE, args.device)
    knn_embedder = Embedder(load_backbone(args.backbone), None, head_embedder.preprocess.context, args.device)
    features = cache_features(dataset, knn_embedder, args.data / ".cache" / "features", pairs=split.test,
                              progress=False)
    rankers = [PopularityRanker(popularity), EmbeddingRanker("knn", knn_embedder, features),
               EmbeddingRanker("head", head_embedder, features)]
    models: dict[str, dict] = {}
    results: dict = {}
    for ranker in rankers:
        started = time.perf_counter()
        results = evaluate_models(dataset, split, [ranker], KS, seed=0, part="test", popularity=popularity)
        times[f"evaluate_{ranker.name}_seconds"] = round(time.perf_counter() - started, 2)
        models.update(results["models"])
    results["models"] = models

    head, pop, knn = models["head"], models["popularity"], models["knn"]
    ratios = {
        "hr10_vs_popularity": _ratio(head["hr"][10], pop["hr"][10]),
        "hr10_vs_knn": _ratio(head["hr"][10], knn["hr"][10]),
        **{f"hr{k}_vs_popularity": _ratio(head["hr"][k], pop["hr"][k]) for k in KS if k != 10},
    }
    checks = {
        "hr10_at_least_2x_popularity": (ratios["hr10_vs_popularity"] or 0) >= TARGETS["hr10_vs_popularity"],
        "hr10_at_least_1.5x_knn": (ratios["hr10_vs_knn"] or 0) >= TARGETS["hr10_vs_knn"],
        "binary_accuracy_at_least_0.9": (head["binary_accuracy"] or 0) >= TARGETS["binary_accuracy"],
        "above_popularity_at_every_k": all((head["hr"][k] or 0) > (pop["hr"][k] or 0) for k in KS),
    }
    summary = {name: {"hr": m["hr"], "binary_accuracy": m["binary_accuracy"], "auc": m["auc"], "mrr": m["mrr"],
                      "hr_warm": m["hr_warm"], "hr_cold": m["hr_cold"]} for name, m in models.items()}
    report = {
        "benchmark": "head vs popularity vs raw-backbone kNN on the synthetic catalogue (test split)",
        "data": str(args.data), "backbone": args.backbone, "n_test": results["n_queries"],
        "cold_start_share": head["cold_start_share"],
        "models": summary, "random": results["random"], "ratios": ratios, "targets": TARGETS, "checks": checks,
        "all_targets_met": all(checks.values()),
        "train": {"args": json.loads((args.run / CONFIG_FILE).read_text(encoding="utf-8")),
                  "metrics": log["metrics"], "history": log["history"]},
        "times": times,
    }
    print(format_table(results, KS))
    print("ratios:", json.dumps(ratios))
    for name, passed in checks.items():
        print(f"  {'PASS' if passed else 'FAIL'} {name}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
