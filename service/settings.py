"""The service's one typed configuration object, read from `STL_*` environment variables."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOG = logging.getLogger(__name__)

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class Settings(BaseSettings):
    """Every knob of the service; see service/SETTINGS.md for what each one does."""

    model_config = SettingsConfigDict(env_prefix="STL_", extra="ignore")

    artifacts: Path = Field(Path("artifacts"), description="folder of published index artifact versions")
    index_version: str | None = Field(None, description="serve this version instead of `current`")
    checkpoint: Path | None = Field(None, description="head checkpoint overriding the artifact's own")
    backbone_weights: Path | None = Field(None, description="backbone weights file (e.g. ResNet-50 offline)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default")
    faiss_threads: int = Field(1, ge=0, description="faiss OpenMP threads per search; 0 keeps faiss's default")
    preprocess_threads: int = Field(0, ge=0, le=64, description="decode/crop/search threads; 0 = CPU count")
    preprocess_inline: bool | None = Field(
        None, description="decode and crop on the batcher's thread; unset: yes on a CPU, no on a GPU"
    )
    max_upload_mb: float = Field(10.0, gt=0, le=1024)
    max_image_pixels: int = Field(40_000_000, ge=64 * 64)
    batch_max_size: int = Field(4, ge=1, le=1024)
    batch_max_wait_ms: float = Field(2.0, ge=0, le=1000)
    batch_workers: int = Field(
        0, ge=0, le=256, description="forward-pass workers; 0: one per torch thread on a CPU, one on a GPU"
    )
    admin_token: SecretStr | None = None
    background_load: bool = Field(
        True, description="accept requests (readyz 503 'loading') while the model and indexes load at start-up"
    )
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
