"""Request and response models of the HTTP API (their names and fields are the public contract)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Source = Literal["embedding", "popularity"]
Strategy = Literal["auto", "popularity"]


class Item(BaseModel):
    product_id: str
    score: float
    rank: int = Field(ge=1, description="1-based position in the list")


class RecommendResponse(BaseModel):
    category: str = Field(description="full category path the items belong to")
    source: Source
    fallback_reason: str | None = Field(None, description="why popularity was served instead of embeddings")
    items: list[Item]
    index_version: str | None
    took_ms: float


class CategoryInfo(BaseModel):
    name: str = Field(description="short name (last path part), or the full path when that is ambiguous")
    path: str
    products: int
    indexed: bool = Field(description="whether an embedding index serves this category")


class CategoriesResponse(BaseModel):
    index_version: str | None
    categories: list[CategoryInfo]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready", "degraded", "loading", "unavailable"]
    index_version: str | None
    categories: int
    indexed_categories: int
    model_loaded: bool
    problem: str | None = None


class ReloadResponse(BaseModel):
    status: Literal["reloaded", "unchanged"]
    previous_version: str | None
    index_version: str | None
    ready: Literal["ready", "degraded"]
    took_ms: float


class ErrorResponse(BaseModel):
    detail: str
