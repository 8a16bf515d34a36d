"""The STL image fetcher against a real HTTP server on 127.0.0.1 that injects faults."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.training.data.fetch_server import ImageServer, make_jpeg
from training.cli.fetch_stl import main
from training.data.fetch import (
    FAILURES_FILE,
    FetchSettings,
    backoff_delay,
    fetch_images,
    get_settings,
    image_url,
    plan_jobs,
)
from training.data.stl import Pair, STLDataset, product_path, scene_path, write_pairs


def hex_id(name: str) -> str:
    return hashlib.md5(name.encode()).hexdigest()


S_OK, S_500, S_SLOW = hex_id("scene-ok"), hex_id("scene-500"), hex_id("scene-slow")
P_OK, P_403, P_404 = hex_id("prod-ok"), hex_id("prod-403"), hex_id("prod-404")
P_TRUNC_ONCE, P_GARBAGE, P_ONLY_CAT = hex_id("prod-trunc-once"), hex_id("prod-garbage"), hex_id("prod-cat-only")
BOX = (0.1, 0.2, 0.6, 0.9)
PAIRS = [
    Pair(S_OK, P_OK, BOX),
    Pair(S_OK, P_403, BOX),
    Pair(S_500, P_404, BOX),
    Pair(S_500, P_TRUNC_ONCE, BOX),
    Pair(S_OK, P_GARBAGE, BOX),
]
CATEGORIES = {
    P_OK: "Apparel & Accessories|Shoes",
    P_403: "Apparel & Accessories|Shoes",
    P_404: "Apparel & Accessories|Clothing|Pants",
    P_TRUNC_ONCE: "Apparel & Accessories|Clothing|Pants",
    P_GARBAGE: "Apparel & Accessories|Jewelry|Earrings",
    P_ONLY_CAT: "Apparel & Accessories|Jewelry|Earrings",
}


@pytest.fixture
def server() -> Iterator[ImageServer]:
    with ImageServer() as running:
        yield running


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "src"
    folder.mkdir()
    pairs_file, categories_file = folder / "fashion.json", folder / "fashion-cat.json"
    write_pairs(pairs_file, PAIRS)
    with pairs_file.open("a", encoding="utf-8") as extra:
        extra.write("{not json\n")  # a malformed line: skipped and reported, not fatal
    categories_file.write_text(json.dumps(CATEGORIES), encoding="utf-8")
    return pairs_file, categories_file


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Never pick up a developer's STL_FETCH_* or proxy settings: only 127.0.0.1 is ever contacted.
    import os

    for name in list(os.environ):
        if name.startswith("STL_FETCH_") or name.lower() in {"http_proxy", "https_proxy", "all_proxy"}:
            monkeypatch.delenv(name)
    monkeypatch.setenv("STL_FETCH_TRUST_ENV", "false")


def run_cli(server: ImageServer, source: tuple[Path, Path], out: Path, *extra: str) -> int:
    pairs_file, categories_file = source
    return main([
        "--pairs", str(pairs_file), "--categories", str(categories_file), "--out", str(out),
        "--base-url", server.base_url, "--retries", "3", "--backoff", "0.001", "--timeout", "3",
        "--concurrency", "4", "--no-progress", *extra,
    ])


def leftover_temp_files(out: Path) -> list[Path]:
    return [path for path in out.rglob("*") if path.name.startswith(".") or path.suffix == ".part"]


def inject_faults(server: ImageServer) -> None:
    server.set_fault(P_403, then="403")
    server.set_fault(P_404, then="404")
    server.set_fault(S_500, "500", "500")
    server.set_fault(P_TRUNC_ONCE, "truncate")
    server.set_fault(P_GARBAGE, then="garbage")


def test_image_url_follows_the_cdn_layout() -> None:
    assert image_url("http://i.pinimg.com", "0027e30879ce3d87f82f699f148bff7e") == (
        "http://i.pinimg.com/400x/00/27/e3/0027e30879ce3d87f82f699f148bff7e.jpg"
    )
    assert image_url("https://cdn.example/", "abcdef12", size="736x") == "https://cdn.example/736x/ab/cd/ef/abcdef12.jpg"
    with pytest.raises(ValueError, match="too short"):
        image_url("http://x", "abc")


def test_settings_come_from_env_and_overrides_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STL_FETCH_BASE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("STL_FETCH_CONCURRENCY", "3")
    settings = get_settings(retries=1, timeout=None)
    assert settings.base_url == "http://127.0.0.1:9"  # trailing slash dropped
    assert (settings.concurrency, settings.retries, settings.timeout) == (3, 1, 30.0)
    assert get_settings(concurrency=7).concurrency == 7
    with pytest.raises(ValidationError, match="base_url"):
        FetchSettings(base_url="ftp://example")
    with pytest.raises(ValidationError, match="concurrency"):
        FetchSettings(concurrency=0)


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    settings = FetchSettings(backoff_base=1.0, backoff_max=5.0)
    rng = random.Random(0)
    for retry, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (10, 5.0)]:
        delays = [backoff_delay(retry, settings, rng) for _ in range(50)]
        assert all(ceiling * 0.5 <= delay <= ceiling for delay in delays)
        assert max(delays) - min(delays) > 0  # jittered, not lockstep


def test_faults_end_as_expected_and_dataset_opens(
    server: ImageServer, source: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inject_faults(server)
    out = tmp_path / "out"
    assert run_cli(server, source, out) == 0  # completed, even with failures

    assert server.attempts[P_403] == 1 and server.attempts[P_404] == 1  # never retried
    assert server.attempts[S_500] == 3  # 500, 500, then the image
    assert server.attempts[P_TRUNC_ONCE] == 2  # truncated body retried, never saved
    assert server.attempts[P_GARBAGE] == 1  # a 200 that is not an image is permanent
    assert server.attempts[S_OK] == 1 and server.attempts[P_OK] == 1  # shared scene fetched once
    assert P_ONLY_CAT not in server.attempts  # not in any pair, no --all-products

    for image_id in (S_OK, S_500):
        assert scene_path(out, image_id).read_bytes() == make_jpeg(image_id)
    for image_id in (P_OK, P_TRUNC_ONCE):
        assert product_path(out, image_id).read_bytes() == make_jpeg(image_id)
    for image_id in (P_403, P_404, P_GARBAGE):
        assert not product_path(out, image_id).exists()
    assert leftover_temp_files(out) == []

    report = json.loads((out / FAILURES_FILE).read_text())
    failures = {failure["id"]: failure for failure in report["failures"]}
    assert set(failures) == {P_403, P_404, P_GARBAGE}
    assert (failures[P_403]["status"], failures[P_403]["kind"], failures[P_403]["attempts"]) == (403, "product", 1)
    assert failures[P_404]["status"] == 404 and failures[P_404]["error"] == "HTTP 404"
    assert failures[P_404]["url"] == image_url(server.base_url, P_404)
    assert "undecodable" in failures[P_GARBAGE]["error"]
    assert report["images"] == {"downloaded": 4, "already_present": 0, "failed": 3}
    assert report["pairs"] == {"usable": 2, "missing_images": 3}
    assert len(report["pair_file_issues"]) == 1 and "malformed JSON" in report["pair_file_issues"][0]

    printed = capsys.readouterr().out
    assert "4 downloaded, 0 already present, 3 failed" in printed
    assert f"{P_404}\tproduct\t{image_url(server.base_url, P_404)}\t404" in printed

    dataset = STLDataset.open(out, on_error="skip")
    assert {(pair.scene_id, pair.product_id) for pair in dataset.pairs} == {(S_OK, P_OK), (S_500, P_TRUNC_ONCE)}
    assert dataset.report.skipped == 4  # three pairs missing an image + the malformed line
    assert (out / "categories.json").read_text() == source[1].read_text()


def test_rerun_downloads_only_what_is_missing(
    server: ImageServer, source: tuple[Path, Path], tmp_path: Path
) -> None:
    inject_faults(server)
    out = tmp_path / "out"
    assert run_cli(server, source, out) == 0
    before = {path: path.stat().st_mtime_ns for path in (out / "images").rglob("*.jpg")}

    server.reset_counts()
    assert run_cli(server, source, out) == 0
    assert dict(server.attempts) == {P_403: 1, P_404: 1, P_GARBAGE: 1}  # only the failed ones again

    server.reset_counts()
    server.clear_faults()  # the images come back online
    assert run_cli(server, source, out) == 0
    assert dict(server.attempts) == {P_403: 1, P_404: 1, P_GARBAGE: 1}
    report = json.loads((out / FAILURES_FILE).read_text())
    assert report["failures"] == [] and report["images"] == {"downloaded": 3, "already_present": 4, "failed": 0}
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in before.items())  # untouched
    dataset = STLDataset.open(out, on_error="skip")
    assert len(dataset.pairs) == len(PAIRS) and dataset.report.skipped == 1  # only the malformed line


def test_always_truncated_body_is_never_saved(server: ImageServer, tmp_path: Path) -> None:
    server.set_fault(P_OK, then="truncate")
    settings = FetchSettings(base_url=server.base_url, retries=2, backoff_base=0.001, trust_env=False)
    jobs = plan_jobs(tmp_path, [Pair(S_OK, P_OK, BOX)], settings)
    outcomes = []
    result = fetch_images(jobs, settings, progress=outcomes.append, seed=0)
    assert server.attempts[P_OK] == 3  # first try + 2 retries
    assert (result.downloaded, result.skipped) == (1, 0)
    [failure] = result.failures
    assert failure.id == P_OK and failure.attempts == 3 and failure.status in (None, 200)
    assert "gave up after 3 attempts" in failure.error
    assert not product_path(tmp_path, P_OK).exists()
    assert leftover_temp_files(tmp_path) == []
    assert sorted(outcome.ok for outcome in outcomes) == [False, True]


def test_slow_response_times_out_then_succeeds(server: ImageServer, tmp_path: Path) -> None:
    server.set_fault(S_SLOW, "slow:1.5")  # longer than the client timeout once, then fine
    server.set_fault(P_OK, "slow:0.1")  # slow but within the timeout
    settings = FetchSettings(base_url=server.base_url, timeout=0.5, backoff_base=0.001, trust_env=False)
    result = fetch_images(plan_jobs(tmp_path, [Pair(S_SLOW, P_OK, BOX)], settings), settings)
    assert (result.downloaded, result.failures) == (2, [])
    assert server.attempts[S_SLOW] == 2 and server.attempts[P_OK] == 1
    assert scene_path(tmp_path, S_SLOW).read_bytes() == make_jpeg(S_SLOW)


def test_timeouts_and_refused_connections_are_reported(tmp_path: Path) -> None:
    # A port nothing listens on: connection refused on every attempt.
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = FetchSettings(base_url=f"http://127.0.0.1:{port}", retries=1, backoff_base=0.001, trust_env=False)
    result = fetch_images(plan_jobs(tmp_path, [Pair(S_OK, P_OK, BOX)], settings), settings)
    assert result.downloaded == 0 and len(result.failures) == 2
    assert all(f.status is None and f.attempts == 2 and "ConnectError" in f.error for f in result.failures)


def test_all_products_flag_fetches_category_only_products(
    server: ImageServer, source: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert run_cli(server, source, out, "--all-products") == 0
    assert server.attempts[P_ONLY_CAT] == 1
    assert product_path(out, P_ONLY_CAT).is_file()
    assert STLDataset.open(out, on_error="skip").catalogue() == sorted(CATEGORIES)


def test_interrupted_run_leftovers_are_cleaned_and_complete_files_kept(
    server: ImageServer, source: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    done = scene_path(out, S_OK)
    done.parent.mkdir(parents=True)
    done.write_bytes(b"complete from an earlier run")
    stale = done.parent / f".{S_500}.jpg.abc123.part"
    stale.write_bytes(b"half")
    assert run_cli(server, source, out) == 0
    assert S_OK not in server.attempts  # already complete: not requested
    assert done.read_bytes() == b"complete from an earlier run"
    assert not stale.exists() and leftover_temp_files(out) == []
    assert scene_path(out, S_500).read_bytes() == make_jpeg(S_500)


def test_usage_errors_exit_2(
    server: ImageServer, source: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs_file, categories_file = source
    out = tmp_path / "out"
    assert main(["--pairs", str(tmp_path / "nope.json"), "--categories", str(categories_file),
                 "--out", str(out)]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert main(["--pairs", str(pairs_file), "--categories", str(categories_file), "--out", str(out),
                 "--base-url", "ftp://example"]) == 2
    assert "base_url" in capsys.readouterr().err
    assert main(["--pairs", str(pairs_file), "--categories", str(categories_file), "--out", str(out),
                 "--concurrency", "0"]) == 2
    assert "concurrency" in capsys.readouterr().err
    bad_categories = tmp_path / "bad-cat.json"
    bad_categories.write_text("[1, 2]")
    assert main(["--pairs", str(pairs_file), "--categories", str(bad_categories), "--out", str(out),
                 "--base-url", server.base_url]) == 2
    assert "cannot read input" in capsys.readouterr().err
    assert server.total_requests() == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["--pairs", str(pairs_file)])  # argparse: missing required options
    assert exit_info.value.code == 2
