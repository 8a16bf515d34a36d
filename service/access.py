"""Who may call the API and how often: API keys (STL_API_KEYS) and a token bucket per key (STL_RATE_LIMIT).

Both are off by default, so the demo stays open; then the route dependency (service/deps.py) returns at
once. Protected: /recommend, /detect, /shop, /products/* and /facets. Open: the page and its static files, /categories
(what the page shows before a key is typed), the probes and /metrics; /admin/* has its own token.

A key comes as `Authorization: Bearer <key>` or `X-API-Key: <key>` and is compared with every configured
key by `hmac.compare_digest` (no early exit), so neither the time taken nor which comparison stopped tells
how much of a guess was right. Keys are never logged; metrics name a key by the first 8 hex digits of its
SHA-256. Without keys a rate limit applies per client address (the peer uvicorn reports, or the
X-Forwarded-For of a trusted proxy, see uvicorn's --forwarded-allow-ips).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections import OrderedDict
from pathlib import Path

from service.metrics import Metrics
from service.settings import Settings

LOG = logging.getLogger(__name__)

# Buckets kept for at most this many keys or addresses; the least recently seen go first (a full bucket
# is no different from a new one, so forgetting it is harmless unless it was being drained).
MAX_BUCKETS = 10_000


class AccessError(ValueError):
    """The key configuration cannot be used (an unreadable or empty key file, STL_API_KEYS of blanks only)."""


def key_id(key: str) -> str:
    """A key's name in metrics: short, stable, and not the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def read_keys(settings: Settings) -> list[str]:
    """STL_API_KEYS (comma-separated, or `@/path`) and STL_API_KEYS_FILE (one a line, '#' comments)."""
    keys: list[str] = []
    files: list[Path] = [settings.api_keys_file] if settings.api_keys_file is not None else []
    if settings.api_keys is not None:
        text = settings.api_keys.get_secret_value().strip()
        if text.startswith("@"):
            files.append(Path(text[1:]))
        else:
            inline = [key.strip() for key in text.split(",") if key.strip()]
            # Keys were meant (STL_API_KEYS=", ," is not unset) but none given: refused, as an empty key file
            # is, rather than running the API open.
            if not inline:
                raise AccessError("STL_API_KEYS holds no key (only commas and blanks); unset it to run without keys")
            keys += inline
    for path in files:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise AccessError(f"cannot read the API key file {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:  # the reason, never the bytes: they may be part of a key
            raise AccessError(f"cannot read the API key file {path}: not UTF-8 text "
                              f"(a bad byte at offset {exc.start})") from None
        found = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise AccessError(f"the API key file {path} holds no key")
        keys += found
    return keys


class TokenBucket:
    """`rate` tokens a second up to `burst`; each request takes one."""

    __slots__ = ("tokens", "updated")

    def __init__(self, burst: int, now: float) -> None:
        self.tokens = float(burst)
        self.updated = now

    def take(self, rate: float, burst: int, now: float) -> float:
        """0.0 when a token was taken; otherwise the seconds until one will be there."""
        self.tokens = min(float(burst), self.tokens + (now - self.updated) * rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / rate


class RateLimiter:
    """A token bucket per name (key id or address). Used on the event loop only, so it needs no lock."""

    def __init__(self, rate: float, burst: int, max_buckets: int = MAX_BUCKETS) -> None:
        self.rate, self.burst, self.max_buckets = rate, burst, max_buckets
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, name: str, now: float | None = None) -> float:
        """0.0 when allowed; otherwise the seconds to wait (Retry-After)."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = TokenBucket(self.burst, now)
            if len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(name)
        return bucket.take(self.rate, self.burst, now)


class Denied(Exception):
    """401 (no or wrong key) or 429 (over the rate limit), with the headers that go with it."""

    def __init__(self, status: int, detail: str, headers: dict[str, str]) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


class Access:
    """The keys and the limiter of one app."""

    def __init__(self, keys: list[str], limiter: RateLimiter | None, metrics: Metrics) -> None:
        # Encoded once; the ids for metrics computed once, never from what a client sent.
        self._keys = [(key.encode(), key_id(key)) for key in keys]
        self.limiter = limiter
        self.metrics = metrics

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics) -> Access:
        rate = settings.rate
        access = cls(read_keys(settings), RateLimiter(*rate) if rate is not None else None, metrics)
        if access.enabled:
            LOG.info("API access: %d key(s), rate limit %s", len(access._keys), settings.rate_limit or "off")
        return access

    @property
    def keys_required(self) -> bool:
        return bool(self._keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys) or self.limiter is not None

    def identify(self, authorization: str | None, api_key: str | None) -> str:
        """The id of the key sent; Denied(401) when none or an unknown one was sent."""
        sent = api_key
        if sent is None and authorization is not None:
            scheme, _, value = authorization.partition(" ")
            sent = value.strip() if scheme.lower() == "bearer" else None
        if not sent:
            self.metrics.unauthorized.labels(reason="missing").inc()
            raise Denied(401, "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                         {"WWW-Authenticate": 'Bearer realm="stl"'})
        candidate = sent.encode()
        found: str | None = None
        for key, name in self._keys:  # every key compared, whichever matches
            if hmac.compare_digest(candidate, key):
                found = name
        if found is None:
            self.metrics.unauthorized.labels(reason="wrong").inc()
            raise Denied(401, "unknown API key", {"WWW-Authenticate": 'Bearer realm="stl", error="invalid_token"'})
        return found

    def admit(self, authorization: str | None, api_key: str | None, address: str | None) -> None:
        """Denied(401) for a missing or wrong key, Denied(429) over the rate limit; None when allowed."""
        name = self.identify(authorization, api_key) if self._keys else None
        if self.limiter is not None:
            wait = self.limiter.take(name if name is not None else f"address:{address}")
            if wait > 0:
                self.metrics.access.labels(key=name or "address", outcome="rate_limited").inc()
                raise Denied(429, f"rate limit exceeded; retry in {wait:.1f} s",
                             {"Retry-After": str(max(1, math.ceil(wait)))})
        if name is not None:
            self.metrics.access.labels(key=name, outcome="allowed").inc()
