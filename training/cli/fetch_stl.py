"""`python -m training fetch-stl`: download STL scene and product images into a dataset directory."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from training.cli import report
from training.cli.args import directory
from training.data.fetch import DEFAULT_BASE_URL, FAILURES_FILE, FetchJob, Outcome, fetch_dataset, get_settings
from training.errors import EXIT_INPUT, TrainingError

PROG = "fetch-stl"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training fetch-stl",
        description="Download STL scene and product images into an STL dataset directory. Resumable: "
        "images already present are skipped. Exits 0 when the run completes, even if some images "
        f"failed (they are listed in OUT/{FAILURES_FILE}); 2 for usage errors.",
    )
    parser.add_argument("--pairs", type=Path, required=True, help="pair file (JSON lines, upstream fashion.json)")
    parser.add_argument("--categories", type=Path, required=True, help="category file (upstream fashion-cat.json)")
    parser.add_argument("--out", type=directory, required=True, help="dataset directory to create or resume")
    parser.add_argument("--all-products", action="store_true",
                        help="also fetch products that appear only in the category file")
    parser.add_argument("--base-url", help=f"image CDN base URL (default {DEFAULT_BASE_URL}; env STL_FETCH_BASE_URL)")
    parser.add_argument("--size", help="size folder on the CDN (default 400x; env STL_FETCH_SIZE)")
    parser.add_argument("--concurrency", type=int, help="parallel downloads (default 16)")
    parser.add_argument("--retries", type=int, help="retries per image on transient errors (default 4)")
    parser.add_argument("--timeout", type=float, help="seconds per attempt (default 30)")
    parser.add_argument("--backoff", type=float, dest="backoff_base",
                        help="first retry delay in seconds, doubled each retry (default 0.5)")
    parser.add_argument("--no-verify", action="store_true", help="do not decode bodies with PIL")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--show-failures", type=int, default=20, help="failures to print (all are in the JSON)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    # httpx logs every request at INFO: tens of thousands of lines that would bury the summary.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        settings = get_settings(
            base_url=args.base_url,
            size=args.size,
            concurrency=args.concurrency,
            retries=args.retries,
            timeout=args.timeout,
            backoff_base=args.backoff_base,
            verify_images=False if args.no_verify else None,
        )
    except TrainingError as exc:
        return report(exc, prefix=PROG)
    for label, path in (("--pairs", args.pairs), ("--categories", args.categories)):
        if not path.is_file():
            print(f"{PROG}: {label} {path} is not a file", file=sys.stderr)
            return EXIT_INPUT

    bar: tqdm | None = None

    def on_plan(jobs: list[FetchJob]) -> None:
        nonlocal bar
        bar = tqdm(total=len(jobs), unit="img", desc=PROG, disable=args.no_progress)

    failed = 0

    def on_outcome(outcome: Outcome) -> None:
        nonlocal failed
        if bar is None:
            return
        if not outcome.ok:
            failed += 1
            bar.set_postfix(failed=failed, refresh=False)
        bar.update(1)

    try:
        fetched = fetch_dataset(args.pairs, args.categories, args.out, settings, args.all_products,
                                on_outcome, on_plan)
    except TrainingError as exc:
        return report(exc, prefix=PROG)
    except KeyboardInterrupt:
        # Every saved image is complete (atomic rename), so a rerun resumes from here.
        print(f"\n{PROG}: interrupted; rerun the same command to resume into {args.out}", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()

    result = fetched.result
    print(f"images: {result.downloaded} downloaded, {result.skipped} already present, "
          f"{len(result.failures)} failed")
    print(f"pairs: {fetched.usable_pairs} usable, {len(fetched.pairs_missing_images)} missing an image, "
          f"{len(fetched.pair_file_issues)} invalid in {args.pairs}")
    if result.failures:
        print("failures (id, kind, url, status or error):")
        for failure in result.failures[: args.show_failures]:
            status = failure.status if failure.status is not None else "-"
            print(f"  {failure.id}\t{failure.kind}\t{failure.url}\t{status}\t{failure.error}")
        hidden = len(result.failures) - args.show_failures
        if hidden > 0:
            print(f"  ... and {hidden} more")
    print(f"report: {args.out / FAILURES_FILE} (exit code 0: the run completed; rerun to retry failures)")
    return 0
