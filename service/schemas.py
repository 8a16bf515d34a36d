"""Request and response models of the HTTP API (their names and fields are the public contract)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import quote

from pydantic import BaseModel, Field

from index.catalogue import ProductRecord

Source = Literal["embedding", "popularity"]
Strategy = Literal["auto", "popularity"]


class ProductData(BaseModel):
    """A product's catalogue data; a field the catalogue lacks is null (so is every field for versions
    built before catalogues)."""

    product_id: str
    title: str | None = None
    brand: str | None = None
    price: float | None = None
    currency: str | None = Field(None, description="ISO 4217 code of the price")
    url: str | None = None
    in_stock: bool | None = None
    labels: dict[str, list[str]] | None = Field(None, description="label key -> values, e.g. {'colour': ['red']}")
    image_url: str | None = Field(None, description="/products/<id>/image, null when there is no thumbnail")


def product_fields(product_id: str, record: ProductRecord | None) -> dict[str, object]:
    """The ProductData fields of a catalogue record (nulls without one)."""
    if record is None:
        return {"product_id": product_id}
    product = record.product
    return {
        "product_id": product_id, "title": product.title, "brand": product.brand, "price": product.price,
        "currency": product.currency, "url": product.url, "in_stock": product.in_stock,
        "labels": {key: list(values) for key, values in product.labels.items()},
        "image_url": f"/products/{quote(product_id, safe='')}/image" if record.thumbnail_etag else None,
    }


class Item(ProductData):
    rank: int = Field(ge=1, description="1-based position in the whole ranking (offset 10: the first is 11)")
    score: float = Field(description="similarity of the product (with dedup: of its group's best match); "
                                     "popularity answers: training pair count")


class RecommendResponse(BaseModel):
    category: str = Field(description="full category path the items belong to")
    source: Source
    fallback_reason: str | None = Field(None, description="why popularity was served instead of embeddings")
    items: list[Item]
    offset: int = Field(0, description="items skipped before the first one returned")
    note: str | None = Field(None, description="why there are no items, e.g. nothing matches the filter")
    index_version: str | None
    took_ms: float
    category_predicted: bool = Field(False, description="the request named no category: the item detector "
                                                         "predicted it for the bbox")
    category_score: float | None = Field(None, description="the detector's score for the predicted category")


class DetectedItem(BaseModel):
    bbox: list[float] = Field(min_length=4, max_length=4,
                              description="[left, top, right, bottom] in [0, 1], origin top-left (as /recommend's)")
    category: str = Field(description="full category path")
    score: float = Field(description="the detector's confidence, 0..1")


class DetectResponse(BaseModel):
    items: list[DetectedItem] = Field(description="the items found, highest score first")
    index_version: str | None
    took_ms: float


class ShopItemResponse(DetectedItem):
    products: list[Item] = Field(description="the same items /recommend answers for this box and category")
    source: Source
    fallback_reason: str | None = None
    note: str | None = None


class ShopResponse(BaseModel):
    items: list[ShopItemResponse] = Field(description="every item found, highest score first, with its products")
    note: str | None = Field(None, description="why there are no items")
    index_version: str | None
    took_ms: float


class ProductResponse(ProductData):
    category: str = Field(description="full category path")
    group_id: str | None = Field(None, description="dedup group: duplicates of one product share it")
    popularity: int | None = Field(None, description="training pairs the product appears in")
    index_version: str | None

    @classmethod
    def of(cls, product_id: str, category: str, record: ProductRecord | None,
           index_version: str | None) -> ProductResponse:
        return cls(**product_fields(product_id, record), category=category,
                   group_id=record.group_id if record else None, popularity=record.popularity if record else None,
                   index_version=index_version)


class PriceRange(BaseModel):
    min: float | None
    max: float | None


class FacetsResponse(BaseModel):
    category: str = Field(description="full category path")
    index_version: str | None
    keys: list[str] = Field(description="keys a filter may use; empty when the version has no catalogue")
    products: int = Field(description="products matching (all of the category without a filter)")
    in_stock: int | None = Field(description="of those, known to be in stock; null without a catalogue")
    price: PriceRange
    brands: dict[str, int] = Field(description="brand -> product count")
    labels: dict[str, dict[str, int]] = Field(description="label key -> value -> product count")


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


class FollowInfo(BaseModel):
    poll_s: float  # about how often `current` is looked at
    seen: str | None  # the version `current` named at the last look (None before the first)


class ReadyResponse(BaseModel):
    status: Literal["ready", "degraded", "loading", "unavailable", "draining"]
    index_version: str | None
    categories: int
    indexed_categories: int
    model_loaded: bool
    problem: str | None = None
    # What runs the forward pass, e.g. "openvino (fp32)" or "torch (no export in this version)"; None
    # when no model is loaded. torch_loaded: whether this process has imported torch at all.
    runtime: str | None = None
    torch_loaded: bool = False
    # The item detector's runtime ("openvino", "onnxruntime"); None: /detect and /shop answer 503 (see problem).
    detector: str | None = None
    detector_precision: str | None = None  # "f32" or "bf16" (STL_DETECT_PRECISION)
    detector_problem: str | None = None
    # STL_RELOAD_POLL_S: this replica follows `current` by itself; None when it does not.
    follow: FollowInfo | None = None


class ReloadResponse(BaseModel):
    status: Literal["reloaded", "unchanged"]
    previous_version: str | None
    index_version: str | None
    ready: Literal["ready", "degraded"]
    took_ms: float


class ErrorResponse(BaseModel):
    detail: str
