"""The service's one typed configuration object, read from `STL_*` environment variables."""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOG = logging.getLogger(__name__)

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$", re.IGNORECASE)
_PERIOD_S = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


def parse_rate(text: str) -> tuple[float, int]:
    """'10/s', '600/min', '1000/h' -> (per second, the count); ValueError otherwise."""
    match = _RATE_RE.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"rate_limit must look like 10/s, 600/min or 1000/h, got {text!r}")
    count = float(match.group(1))
    return count / _PERIOD_S[match.group(2).lower()], math.ceil(count)


class Settings(BaseSettings):
    """Every knob of the service; see service/SETTINGS.md for what each one does."""

    model_config = SettingsConfigDict(env_prefix="STL_", extra="ignore")

    artifacts: Path = Field(Path("artifacts"), description="folder of published index artifact versions")
    index_version: str | None = Field(None, description="serve this version instead of `current`")
    checkpoint: Path | None = Field(None, description="head checkpoint overriding the artifact's own")
    backbone_weights: Path | None = Field(None, description="backbone weights file (e.g. ResNet-50 offline)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    runtime: Literal["auto", "openvino", "onnxruntime", "torch"] = Field(
        "auto", description="what runs the forward pass; auto: OpenVINO over the version's export on a CPU, "
                            "torch on a GPU (and for versions without an export)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: OpenVINO on a CPU with AVX-512 BF16 or AMX only; refused at start elsewhere")
    runtime_threads: int = Field(0, ge=0, le=256, description="OpenVINO / ONNX Runtime threads; 0: every core")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default")
    faiss_threads: int = Field(1, ge=0, description="faiss OpenMP threads per search; 0 keeps faiss's default")
    # Compressed indexes (SQ8 / PQ codes): re-ranked from the stored float vectors (service/search.py Rerank).
    rerank_candidates: int = Field(
        200, ge=0, le=100_000,
        description="rows of a compressed index re-scored from the float vectors per search (at least 4x the hits "
                    "wanted); 0: serve the codes' own ranking"
    )
    preprocess_threads: int = Field(0, ge=0, le=64, description="decode/crop/search threads; 0 = CPU count")
    preprocess_inline: bool | None = Field(
        None, description="decode and crop on the batcher's thread (true) or in the pool (false); unset: the pool "
                          "on a GPU, the batcher's thread with torch on a CPU, else the thread while idle and "
                          "the pool under load"
    )
    max_upload_mb: float = Field(10.0, gt=0, le=1024)
    max_image_pixels: int = Field(40_000_000, ge=64 * 64)
    batch_max_size: int = Field(4, ge=1, le=1024)
    batch_max_wait_ms: float = Field(2.0, ge=0, le=1000)
    batch_workers: int = Field(
        0, ge=0, le=256,
        description="forward-pass workers; 0: one per torch thread with torch on a CPU, else one"
    )
    detect_score_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="/detect and /shop: items scoring below this are not reported")
    detect_nms_threshold: float = Field(
        0.6, gt=0.0, le=1.0, description="boxes of one category overlapping more than this (IoU) are one item")
    detect_max_items: int = Field(10, ge=1, le=100, description="most items /detect and /shop report per photo")
    detect_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="the item detector's precision in OpenVINO; auto: bf16 where the CPU runs it natively")
    admin_token: SecretStr | None = None
    queue_budget_ms: float = Field(
        500.0, gt=0, le=600_000, description="admit a scene only if its expected queue wait fits this"
    )
    request_timeout_ms: float = Field(
        10_000.0, gt=0, le=3_600_000, description="answer 503 when an API request has no answer by then"
    )
    drain_s: float = Field(15.0, ge=0, le=3600, description="on SIGTERM, time to answer what was admitted")
    keep_alive_s: float = Field(
        75.0, gt=0, le=3600,
        description="idle keep-alive connections are closed after this long; above every client's and load "
                    "balancer's own idle timeout, so that they close first (service/server.py)"
    )
    api_keys: SecretStr | None = Field(
        None, description="comma-separated API keys, or @/path of a file of them (one a line); unset: open"
    )
    api_keys_file: Path | None = Field(None, description="a file of API keys, one a line ('#' comments)")
    rate_limit: str | None = Field(None, description="per key (or per client address): e.g. 10/s, 600/min")
    rate_burst: int | None = Field(None, ge=1, le=1_000_000, description="bucket size; unset: the rate's count")
    cors_origins: str | None = Field(None, description="comma-separated origins allowed to call the API; * for any")
    background_load: bool = Field(
        True, description="accept requests (readyz 503 'loading') while the model and indexes load at start-up"
    )
    # Replicas follow the index (service/follow.py): one setting and the check that it cannot contradict a pin.
    reload_poll_s: float = Field(
        0.0, ge=0, le=86_400,
        description="look at the artifacts' `current` link about this often (seconds) and reload when it moves; 0: off"
    )

    @field_validator("reload_poll_s")
    @classmethod
    def _follow_or_pin(cls, value: float, info: ValidationInfo) -> float:
        if value > 0 and info.data.get("index_version"):
            raise ValueError("STL_RELOAD_POLL_S follows the `current` link and STL_INDEX_VERSION pins one version: "
                             "set one or the other")
        return value

    log_level: str = "INFO"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {value!r}")
        return level

    @field_validator("admin_token")
    @classmethod
    def _admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty STL_ADMIN_TOKEN= means "disabled", not "the empty string is the password".
        if value is None or not value.get_secret_value().strip():
            return None
        return value

    @field_validator("api_keys", "rate_limit", "cors_origins", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # STL_API_KEYS= (as compose writes an unset variable) means "off", never "the empty key".
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, SecretStr) and not value.get_secret_value().strip():
            return None
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)
        return value

    @property
    def rate(self) -> tuple[float, int] | None:
        """(tokens per second, bucket size) of STL_RATE_LIMIT and STL_RATE_BURST; None when off."""
        if self.rate_limit is None:
            return None
        per_second, count = parse_rate(self.rate_limit)
        return per_second, self.rate_burst or max(1, count)

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in (self.cors_origins or "").split(",") if origin.strip()]

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def preprocess_workers(self) -> int:
        return self.preprocess_threads or os.cpu_count() or 1

    @property
    def admin_enabled(self) -> bool:
        return self.admin_token is not None


def get_settings() -> Settings:
    """Settings from the environment, built on demand (never at import) so tests can pass their own."""
    return Settings()
