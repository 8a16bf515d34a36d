"""The engine owns the use case: called directly, without FastAPI, it answers what the HTTP API answers."""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import service.routes
from service.engine import Engine, NotServing, RankedItem, preprocess_mode
from service.images import BadInput, parse_bbox
from service.metrics import Metrics
from tests.service.helpers import SHOES, make_settings, post, scene_jpeg
from tests.service.test_fallback import expected_popular


@pytest.fixture(scope="module")
def engine(built: dict[str, Path]) -> Iterator[Engine]:
    engine = Engine.start(make_settings(built["root"]), Metrics())
    engine.load()
    try:
        yield engine
    finally:
        engine.close()


@pytest.mark.parametrize(("bbox", "k", "strategy"), [("0.1,0.2,0.7,0.9", 5, "auto"), (None, 3, "auto"),
                                                     ("0.2,0.2,0.8,0.8", 4, "popularity")])
def test_recommend_called_directly_answers_as_the_http_api(engine: Engine, client: TestClient, bbox: str | None,
                                                           k: int, strategy: str) -> None:
    image = scene_jpeg(seed=13)
    direct = asyncio.run(engine.recommend(image, "Shoes", parse_bbox(bbox), k, strategy))
    body = post(client, image, category="Shoes", bbox=bbox, k=k, strategy=strategy).json()
    assert direct.category == body["category"] == SHOES
    assert direct.source == body["source"] == ("embedding" if strategy == "auto" else "popularity")
    assert direct.fallback_reason == body["fallback_reason"]
    assert direct.index_version == body["index_version"]
    assert [item.product_id for item in direct.items] == [item["product_id"] for item in body["items"]]
    assert [item.rank for item in direct.items] == list(range(1, k + 1))
    assert [item.score for item in direct.items] == pytest.approx([item["score"] for item in body["items"]], abs=1e-6)


def test_the_engine_counts_its_fallbacks_and_refuses_bad_input(engine: Engine, built: dict) -> None:
    def strategy_fallbacks() -> float:
        return engine.metrics.registry.get_sample_value("stl_fallbacks_total", {"reason": "strategy"}) or 0.0

    before = strategy_fallbacks()
    answer = asyncio.run(engine.recommend(scene_jpeg(), "Shoes", None, 2, "popularity"))
    assert [item.product_id for item in answer.items] == expected_popular(built["root"], SHOES, 2)
    assert isinstance(answer.items[0], RankedItem) and answer.fallback_reason == "popularity strategy requested"
    assert strategy_fallbacks() == before + 1
    with pytest.raises(BadInput, match="known categories") as unknown:
        asyncio.run(engine.recommend(scene_jpeg(), "Hats"))
    assert unknown.value.status == 400
    with pytest.raises(BadInput, match="not an image"):
        asyncio.run(engine.recommend(b"not an image", "Shoes"))
    with pytest.raises(BadInput, match="too small"):  # refused in the batcher's pre step, a 4xx still
        asyncio.run(engine.recommend(scene_jpeg(), "Shoes", parse_bbox("0.5,0.5,0.505,0.505")))


def test_an_engine_with_nothing_loaded_is_not_serving(tmp_path: Path) -> None:
    engine = Engine.start(make_settings(tmp_path / "empty"), Metrics())
    try:
        with pytest.raises(NotServing, match="still loading") as loading:
            asyncio.run(engine.recommend(scene_jpeg(), "Shoes"))
        assert loading.value.loading
        engine.load()
        with pytest.raises(NotServing, match="no index artifact is available") as absent:
            engine.serving()
        assert not absent.value.loading
    finally:
        engine.close()


@pytest.mark.parametrize(("inline", "runtime", "mode"), [
    (None, "openvino", "adaptive"), (None, "torch", "inline"), (True, "openvino", "inline"),
    (False, "openvino", "pool"), (False, "torch", "pool")])
def test_where_crops_are_made_is_decided_once_when_the_engine_starts(tmp_path: Path, inline: bool | None,
                                                                      runtime: str, mode: str) -> None:
    settings = make_settings(tmp_path, preprocess_inline=inline, runtime=runtime)  # device cpu
    assert preprocess_mode(settings) == mode
    engine = Engine.start(settings, Metrics())
    try:
        assert (engine.batcher.pool is engine.cpu_pool) is (mode != "inline")
        assert engine.batcher.inline_when_idle is (mode == "adaptive")
    finally:
        engine.close()


def test_the_route_module_holds_no_image_tensor_or_index_code() -> None:
    tree = ast.parse(Path(service.routes.__file__).read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    heavy = {"torch", "faiss", "numpy", "PIL", "index", "training"}
    assert {name for name in imported if name.split(".")[0] in heavy} == set()
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    stage_code = {"decode_image", "bbox_to_pixels", "transform", "load_image", "embed_batch", "search",
                  "run_in_executor", "batcher", "popularity", "resolve"}
    assert names & stage_code == set()
