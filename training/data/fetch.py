"""Download STL scene and product images from their hashes: `python -m training fetch-stl`.

Each id is an image signature on Pinterest's CDN: `<base>/400x/<h[0:2]>/<h[2:4]>/<h[4:6]>/<h>.jpg`
(see `../shared/stl/README.md`). Downloads run concurrently (bounded), retry transient failures with
exponential backoff, and never leave a half-written image: bodies go to a temp file in the target folder
and are renamed into place only when complete (and, by default, decodable). A rerun skips every image
already present, so an interrupted fetch resumes where it stopped. Failures are collected and written
to `<out>/fetch_failures.json`, never raised.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from PIL import Image
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.data.stl import (
    CATEGORIES_FILE,
    IMAGE_SUFFIX,
    PAIRS_FILE,
    PRODUCTS_DIR,
    SCENES_DIR,
    CategoryMap,
    Kind,
    LoadReport,
    Pair,
    STLDataset,
    STLFormatError,
    product_path,
    read_pairs,
    scene_path,
)
from training.errors import DataError
from training.io import copy_atomic, write_json_atomic

LOG = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://i.pinimg.com"
FAILURES_FILE = "fetch_failures.json"
TEMP_SUFFIX = ".part"
# 408/429 are the server asking us to come back later; every 5xx is treated as transient too.
RETRY_STATUSES = frozenset({408, 425, 429})


class FetchSettings(BaseSettings):
    """Fetcher settings; every field can be set from the environment as STL_FETCH_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="STL_FETCH_", extra="ignore")

    base_url: str = DEFAULT_BASE_URL
    size: str = "400x"
    concurrency: int = Field(16, ge=1, le=512)
    retries: int = Field(4, ge=0, le=50, description="extra attempts after the first, for transient failures")
    timeout: float = Field(30.0, gt=0, description="seconds allowed for one whole attempt")
    backoff_base: float = Field(0.5, ge=0, description="delay before the first retry; doubles each retry")
    backoff_max: float = Field(30.0, ge=0)
    verify_images: bool = Field(True, description="decode each body with PIL; undecodable is a failure")
    trust_env: bool = Field(True, description="honour HTTP(S)_PROXY and friends from the environment")
    user_agent: str = "shop-the-look-fetch/0.1"

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")) or len(value) <= len("https://"):
            raise ValueError(f"base_url must be an http:// or https:// URL, got {value!r}")
        return value

    @field_validator("size")
    @classmethod
    def _size_folder(cls, value: str) -> str:
        value = value.strip("/")
        if not value or "/" in value:
            raise ValueError(f"size must be one folder name such as '400x', got {value!r}")
        return value


def get_settings(**overrides: object) -> FetchSettings:
    """Settings from the environment, with explicit (non-None) overrides winning.

    Invalid values raise DataError naming each bad field (FetchSettings itself raises pydantic's error).
    """
    try:
        return FetchSettings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise DataError(f"invalid settings: {errors}") from exc


def image_url(base_url: str, image_id: str, size: str = "400x") -> str:
    if len(image_id) < 6:
        raise ValueError(f"image id {image_id!r} is too short to build a CDN path (need >= 6 characters)")
    h = image_id
    return f"{base_url.rstrip('/')}/{size}/{h[0:2]}/{h[2:4]}/{h[4:6]}/{h}{IMAGE_SUFFIX}"


@dataclass(frozen=True)
class FetchJob:
    image_id: str
    kind: Kind
    url: str
    dest: Path


@dataclass(frozen=True)
class Failure:
    id: str
    kind: Kind
    url: str
    status: int | None  # final HTTP status; None when no response came back (timeout, connection error)
    error: str
    attempts: int


@dataclass
class FetchResult:
    downloaded: int = 0
    skipped: int = 0  # already present before this run
    failures: list[Failure] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.downloaded + self.skipped + len(self.failures)


@dataclass(frozen=True)
class Outcome:
    """What happened to one job; passed to the progress callback."""

    job: FetchJob
    ok: bool
    status: int | None = None
    error: str = ""
    attempts: int = 0


class _Retry(Exception):
    def __init__(self, error: str, status: int | None = None, delay: float | None = None) -> None:
        super().__init__(error)
        self.status, self.delay = status, delay


class _Permanent(Exception):
    def __init__(self, error: str, status: int | None = None) -> None:
        super().__init__(error)
        self.status = status


def plan_jobs(
    out: str | Path,
    pairs: Iterable[Pair],
    settings: FetchSettings,
    extra_products: Iterable[str] = (),
) -> list[FetchJob]:
    """One job per distinct scene and product (pairs share both), scenes first, in first-seen order."""
    scenes: dict[str, None] = {}
    products: dict[str, None] = {}
    for pair in pairs:
        scenes.setdefault(pair.scene_id)
        products.setdefault(pair.product_id)
    for product_id in extra_products:
        products.setdefault(product_id)
    jobs = [FetchJob(i, "scene", image_url(settings.base_url, i, settings.size), scene_path(out, i)) for i in scenes]
    jobs += [
        FetchJob(i, "product", image_url(settings.base_url, i, settings.size), product_path(out, i))
        for i in products
    ]
    return jobs


def is_complete(path: Path) -> bool:
    # Only complete bodies are ever renamed into place, so a non-empty file at the final name is done.
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def remove_stale_temp_files(folders: Iterable[Path]) -> int:
    """Delete temp files a killed run (SIGKILL, power loss) could not clean up; returns how many."""
    removed = 0
    for folder in folders:
        if folder.is_dir():
            for stale in folder.glob(f".*{TEMP_SUFFIX}"):
                stale.unlink(missing_ok=True)
                removed += 1
    return removed


def _check_image(body: bytes) -> None:
    try:
        with Image.open(io.BytesIO(body)) as image:
            image.load()  # a full decode: verify() alone misses a JPEG cut short
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad data
        detail = str(exc).split(" <_io.")[0]  # PIL names the BytesIO object; no use in a report
        raise _Permanent(f"undecodable image: {type(exc).__name__}: {detail}") from exc


def _save(body: bytes, dest: Path, verify: bool) -> None:
    """Write atomically: temp file in the same folder (same filesystem), then rename over the target."""
    if verify:
        _check_image(body)
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(handle, "wb") as temp:
            temp.write(body)
        os.replace(temp_name, dest)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def backoff_delay(retry: int, settings: FetchSettings, rng: random.Random) -> float:
    """Delay before retry number `retry` (1-based): exponential, capped, with jitter so that many
    workers failing together (a CDN hiccup) do not retry in lockstep."""
    ceiling = min(settings.backoff_max, settings.backoff_base * 2 ** (retry - 1))
    return ceiling * rng.uniform(0.5, 1.0)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff


async def _attempt(client: httpx.AsyncClient, job: FetchJob, settings: FetchSettings) -> None:
    try:
        # httpx's timeout is per network operation; this bounds the whole attempt, so a server that
        # trickles bytes cannot hold a worker forever.
        async with asyncio.timeout(settings.timeout):
            response = await client.get(job.url)
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise _Retry(f"timeout after {settings.timeout:g}s ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:  # connection refused/reset, body cut short (RemoteProtocolError)
        raise _Retry(f"{type(exc).__name__}: {exc}") from exc
    status = response.status_code
    if status >= 500 or status in RETRY_STATUSES:
        raise _Retry(f"HTTP {status}", status, _retry_after(response))
    if status != 200:
        raise _Permanent(f"HTTP {status}", status)
    expected = response.headers.get("content-length", "")
    if expected.isdigit() and response.num_bytes_downloaded < int(expected):
        raise _Retry(f"truncated body: {response.num_bytes_downloaded} of {expected} bytes", status)
    if not response.content:
        raise _Permanent("empty body", status)
    try:
        await asyncio.to_thread(_save, response.content, job.dest, settings.verify_images)
    except _Permanent as exc:
        exc.status = status
        raise


async def _fetch_one(
    client: httpx.AsyncClient, job: FetchJob, settings: FetchSettings, rng: random.Random
) -> Outcome:
    attempts = 0
    while True:
        attempts += 1
        try:
            await _attempt(client, job, settings)
            return Outcome(job, True, 200, "", attempts)
        except _Permanent as exc:
            return Outcome(job, False, exc.status, str(exc), attempts)
        except _Retry as exc:
            if attempts > settings.retries:
                return Outcome(job, False, exc.status, f"{exc} (gave up after {attempts} attempts)", attempts)
            delay = backoff_delay(attempts, settings, rng)
            if exc.delay is not None:
                delay = min(max(delay, exc.delay), settings.backoff_max)
            LOG.debug("retrying %s in %.2fs: %s", job.url, delay, exc)
            await asyncio.sleep(delay)
        except OSError as exc:  # disk full, permission denied: report it, keep the others going
            return Outcome(job, False, None, f"cannot write {job.dest}: {exc}", attempts)


async def fetch_images_async(
    jobs: Sequence[FetchJob],
    settings: FetchSettings,
    progress: Callable[[Outcome], None] | None = None,
    seed: int | None = None,
) -> FetchResult:
    """Fetch every job whose file is not already complete; failures are returned, not raised."""
    result = FetchResult()
    pending: list[FetchJob] = []
    for job in jobs:
        if not is_complete(job.dest):
            pending.append(job)
        elif progress is not None:
            progress(Outcome(job, True, None, "already present", 0))
    result.skipped = len(jobs) - len(pending)
    LOG.info("%d images to fetch, %d already present", len(pending), result.skipped)
    if not pending:
        return result
    rng = random.Random(seed)
    queue = iter(pending)  # workers share one iterator; safe because asyncio switches only at awaits
    limits = httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency)
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(settings.timeout),
        limits=limits,
        follow_redirects=True,
        trust_env=settings.trust_env,
        headers={"User-Agent": settings.user_agent},
    ) as client:

        async def worker() -> None:
            for job in queue:
                outcome = await _fetch_one(client, job, settings, rng)
                if outcome.ok:
                    result.downloaded += 1
                else:
                    result.failures.append(
                        Failure(job.image_id, job.kind, job.url, outcome.status, outcome.error, outcome.attempts)
                    )
                    LOG.debug("failed %s %s: %s", job.kind, job.image_id, outcome.error)
                if progress is not None:
                    progress(outcome)

        await asyncio.gather(*(worker() for _ in range(min(settings.concurrency, len(pending)))))
    result.failures.sort(key=lambda failure: (failure.kind, failure.id))
    return result


def fetch_images(
    jobs: Sequence[FetchJob],
    settings: FetchSettings,
    progress: Callable[[Outcome], None] | None = None,
    seed: int | None = None,
) -> FetchResult:
    """Synchronous wrapper around `fetch_images_async` (starts its own event loop)."""
    return asyncio.run(fetch_images_async(jobs, settings, progress, seed))


@dataclass
class FetchReport:
    """The whole `fetch-stl` run: what was fetched and which pairs are usable afterwards."""

    out: Path
    result: FetchResult
    pair_file_issues: list[str]
    usable_pairs: int
    pairs_missing_images: list[str]

    def to_dict(self, settings: FetchSettings) -> dict[str, object]:
        return {
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "settings": settings.model_dump(),
            "images": {
                "downloaded": self.result.downloaded,
                "already_present": self.result.skipped,
                "failed": len(self.result.failures),
            },
            "pairs": {"usable": self.usable_pairs, "missing_images": len(self.pairs_missing_images)},
            "failures": [asdict(failure) for failure in self.result.failures],
            "pair_file_issues": self.pair_file_issues,
            "pairs_missing_images": self.pairs_missing_images,
        }


def fetch_dataset(
    pairs_file: str | Path,
    categories_file: str | Path,
    out: str | Path,
    settings: FetchSettings,
    all_products: bool = False,
    progress: Callable[[Outcome], None] | None = None,
    on_plan: Callable[[list[FetchJob]], None] | None = None,
) -> FetchReport:
    """Build an STL dataset directory at `out`: copy the pair and category files, fetch the images,
    write `fetch_failures.json`, and check which pairs `STLDataset.open(out, on_error="skip")` keeps.

    Raises DataError ("cannot read input: ...") for unusable input files; download failures never raise.
    """
    pairs_file, categories_file, out = Path(pairs_file), Path(categories_file), Path(out)
    issues = LoadReport()
    try:
        categories = CategoryMap.from_file(categories_file)
        pairs = read_pairs(pairs_file, categories, on_error="skip", report=issues)
    except (FileNotFoundError, STLFormatError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read input: {exc}") from exc
    if issues.skipped:
        LOG.warning("%d records of %s skipped (see %s)", issues.skipped, pairs_file, FAILURES_FILE)
    for folder in (SCENES_DIR, PRODUCTS_DIR):
        (out / folder).mkdir(parents=True, exist_ok=True)
    # Copied first, so even an interrupted fetch leaves a directory STLDataset can open.
    copy_atomic(pairs_file, out / PAIRS_FILE)
    copy_atomic(categories_file, out / CATEGORIES_FILE)
    removed = remove_stale_temp_files([out / SCENES_DIR, out / PRODUCTS_DIR])
    if removed:
        LOG.info("removed %d partial files left by an interrupted run", removed)

    extra = sorted(categories.product_to_path) if all_products else []
    jobs = plan_jobs(out, pairs, settings, extra)
    if on_plan is not None:
        on_plan(jobs)
    result = fetch_images(jobs, settings, progress)

    dataset = STLDataset.open(out, on_error="skip")
    # pairs.jsonl is a byte copy, so its line numbers are the input's: drop the records already
    # reported as invalid and keep what is missing because of the images.
    invalid_lines = {issue.line for issue in issues.issues}
    report = FetchReport(
        out=out,
        result=result,
        pair_file_issues=[str(issue) for issue in issues.issues],
        usable_pairs=len(dataset.pairs),
        pairs_missing_images=[str(issue) for issue in dataset.report.issues if issue.line not in invalid_lines],
    )
    write_json_atomic(out / FAILURES_FILE, report.to_dict(settings))
    return report
