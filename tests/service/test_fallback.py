"""Popularity fallback: every reason answers 200, source "popularity" and a reason; 503 only without an artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from index.artifact import open_artifact
from service.app import create_app
from tests.service.helpers import PANTS, SHOES, make_settings, post
from training.data.popularity import Popularity
from training.model.runtimes import ExportManifest


def metric(client: TestClient, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def expected_popular(root: Path, category: str, k: int) -> list[str]:
    table = Popularity.from_json(open_artifact(root).path / "popularity.json")
    return [pid for pid, _ in table.top(category, k)]


def assert_popularity(body: dict, root: Path, category: str, k: int, reason: str) -> None:
    assert body["source"] == "popularity"
    assert reason in body["fallback_reason"]
    assert body["category"] == category
    assert [item["product_id"] for item in body["items"]] == expected_popular(root, category, k)
    assert [item["rank"] for item in body["items"]] == list(range(1, len(body["items"]) + 1))
    counts = [item["score"] for item in body["items"]]
    assert counts == sorted(counts, reverse=True) and counts[0] > 0


def test_popularity_strategy(client: TestClient, built: dict) -> None:
    before = metric(client, "stl_fallbacks_total", reason="strategy")
    response = post(client, strategy="popularity", k=4)
    assert response.status_code == 200
    assert_popularity(response.json(), built["root"], SHOES, 4, "popularity strategy requested")
    assert metric(client, "stl_fallbacks_total", reason="strategy") == before + 1


def test_category_without_index(artifacts: Path) -> None:
    # A version whose build indexed no Pants (the popularity table still knows the category).
    manifest_path = open_artifact(artifacts).path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["categories"][PANTS]
    manifest_path.write_text(json.dumps(manifest))
    with TestClient(create_app(make_settings(artifacts))) as client:
        response = post(client, category="Pants", k=3)
        assert response.status_code == 200
        assert_popularity(response.json(), artifacts, PANTS, 3, "has no embedding index")
        assert post(client, category="Shoes", k=3).json()["source"] == "embedding"
        listed = {c["path"]: c["indexed"] for c in client.get("/categories").json()["categories"]}
        assert listed[PANTS] is False and listed[SHOES] is True
        assert metric(client, "stl_fallbacks_total", reason="no_index") == 1


def _damage_model(root: Path) -> None:
    (open_artifact(root).path / "model.pt").write_bytes(b"not a checkpoint")


def _damage_index(root: Path) -> None:
    version = open_artifact(root)
    index_file = version.manifest.categories[SHOES].index_file
    (version.path / index_file).write_bytes(b"\x00" * 64)


def _damage_export(root: Path) -> None:
    version = open_artifact(root)
    graph = ExportManifest.read(version.export_dir).backbone_file
    (version.export_dir / graph).write_bytes(b"not a graph")


@pytest.mark.parametrize(
    ("damage", "use_other_head", "runtime", "problem"),
    [(_damage_model, False, "torch", "not a readable head checkpoint"),
     (_damage_export, False, "auto", "does not match the sha256"),
     (_damage_index, False, "auto", "corrupt"),
     (None, True, "auto", "built with another embedder")],
    ids=["corrupt-model", "corrupt-export", "corrupt-index", "checkpoint-mismatch"],
)
def test_degraded_when_no_valid_model(artifacts: Path, built: dict, damage, use_other_head: bool, runtime: str,
                                      problem: str) -> None:
    if damage is not None:
        damage(artifacts)
    settings = make_settings(artifacts, checkpoint=built["head1"] if use_other_head else None, runtime=runtime)
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded" and ready.json()["model_loaded"] is False
        assert problem in ready.json()["problem"]
        response = post(client, k=5)
        assert response.status_code == 200
        assert_popularity(response.json(), artifacts, SHOES, 5, "no valid model/index is loaded")
        assert metric(client, "stl_fallbacks_total", reason="model_unavailable") == 1


def test_embedding_failure_falls_back_and_is_counted(artifacts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with TestClient(create_app(make_settings(artifacts))) as client:
        runtime = client.app.state.engine.holder.current.encoder.runtime

        def broken(*args, **kwargs):
            raise RuntimeError("simulated CUDA error")

        monkeypatch.setattr(runtime, "vectors", broken)
        response = post(client, k=3)
        assert response.status_code == 200
        assert_popularity(response.json(), artifacts, SHOES, 3, "embedding failed: RuntimeError")
        assert metric(client, "stl_fallbacks_total", reason="embedding_failed") == 1
        monkeypatch.undo()
        assert post(client, k=3).json()["source"] == "embedding"  # the worker survived


def test_no_artifact_at_all_is_503(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path / "empty"))) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "unavailable" and "no index version is published" in ready.json()["problem"]
        response = post(client)
        assert response.status_code == 503
        assert "no index artifact is available" in response.json()["detail"]
        assert client.get("/categories").status_code == 503


def test_broken_popularity_table_keeps_embeddings(artifacts: Path, built: dict) -> None:
    (open_artifact(artifacts).path / "popularity.json").write_text("{broken")
    with TestClient(create_app(make_settings(artifacts))) as client:
        ready = client.get("/readyz").json()
        assert ready["status"] == "degraded" and "popularity unavailable" in ready["problem"]
        assert ready["model_loaded"] is True
        assert post(client, k=2).json()["source"] == "embedding"
        fallback = post(client, k=2, strategy="popularity")
        # The catalogue keeps its own copy of the popularity counts, so the fallback still has an answer.
        assert fallback.status_code == 200
        assert [item["product_id"] for item in fallback.json()["items"]] == expected_popular(built["root"], SHOES, 2)
