"""Exporting the embedder to ONNX: valid graphs with a dynamic batch, a self-describing manifest, and a
check that refuses an export whose vectors are not torch's."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from training.errors import ModelMismatch
from training.io import file_sha256
from training.model.backbones import load_backbone
from training.model.embedder import Embedder
from training.model.export import MIN_COSINE, OPSET, check_export, export_embedder
from training.model.head import CompatibilityHead, HeadConfig
from training.model.runtimes import ExportManifest, ExportMismatch, load_runtime
from training.model.runtimes.base import MANIFEST_FILE


def _embedder(separate: bool = False, seed: int = 1, head_sha256: str | None = "head-sha") -> Embedder:
    backbone = load_backbone("tiny")
    torch.manual_seed(seed)
    head = CompatibilityHead(HeadConfig(in_dim=backbone.dim, hidden_dim=24, out_dim=16, separate=separate))
    for branch in {id(head.scene): head.scene, id(head.product): head.product}.values():
        branch.layers[1].running_mean.uniform_(-1.0, 1.0)  # non-trivial BatchNorm, folded by the exporter
        branch.layers[1].running_var.uniform_(0.5, 2.0)
    return Embedder(backbone, head, device="cpu", head_sha256=head_sha256)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    embedder = _embedder()
    out_dir = tmp_path_factory.mktemp("export-shared")
    return embedder, out_dir, export_embedder(embedder, out_dir)


def test_manifest_describes_the_files_and_the_model(shared):
    embedder, out_dir, manifest = shared
    assert manifest == ExportManifest.read(out_dir)  # written and read through the same type
    assert manifest.backbone_file == "backbone.onnx"
    assert manifest.head_files == {"scene": "head.onnx", "product": "head.onnx"}  # one shared branch
    assert sorted(manifest.sha256) == ["backbone.onnx", "head.onnx"]
    assert all(file_sha256(out_dir / name) == digest for name, digest in manifest.sha256.items())
    assert (manifest.opset, manifest.image_size, manifest.backbone_dim, manifest.dim) == (OPSET, 64, 32, 16)
    assert manifest.fingerprint == embedder.fingerprint()
    assert json.loads((out_dir / MANIFEST_FILE).read_text())["fingerprint"]["head_sha256"] == "head-sha"


def test_graphs_are_valid_onnx_with_a_dynamic_batch(shared):
    _, out_dir, manifest = shared
    for name, input_dims in {"backbone.onnx": [3, 64, 64], "head.onnx": [32]}.items():
        model = onnx.load(str(out_dir / name))
        onnx.checker.check_model(model, full_check=True)
        assert max(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")) >= 17
        (graph_input,), (graph_output,) = model.graph.input, model.graph.output
        input_shape = graph_input.type.tensor_type.shape.dim
        assert input_shape[0].dim_param == "batch" and not input_shape[0].dim_value, name
        assert [dim.dim_value for dim in input_shape[1:]] == input_dims
        assert graph_output.type.tensor_type.shape.dim[0].dim_param == "batch"
    runtime = load_runtime("onnxruntime", out_dir)
    for batch in (1, 3):
        images = np.zeros((batch, 3, 64, 64), dtype=np.float32)
        assert runtime.backbone_features(images).shape == (batch, 32)
        assert runtime.vectors(images, "scene").shape == (batch, 16)


def test_separate_branches_get_one_graph_each(tmp_path):
    embedder = _embedder(separate=True)
    manifest = export_embedder(embedder, tmp_path)
    assert manifest.head_files == {"scene": "head_scene.onnx", "product": "head_product.onnx"}
    assert manifest.sha256["head_scene.onnx"] != manifest.sha256["head_product.onnx"]
    runtime = load_runtime("onnxruntime", tmp_path)
    batch = np.random.default_rng(0).uniform(-1, 1, (3, 3, 64, 64)).astype(np.float32)
    scene, product = runtime.vectors(batch, "scene"), runtime.vectors(batch, "product")
    features = embedder.backbone_features(torch.from_numpy(batch))
    np.testing.assert_allclose(scene, embedder.project(features, "scene"), atol=1e-5)
    np.testing.assert_allclose(product, embedder.project(features, "product"), atol=1e-5)
    assert not np.allclose(scene, product, atol=1e-3)  # the kinds really go through different towers


def test_export_without_a_head_normalises_backbone_features(tmp_path):
    embedder = Embedder(load_backbone("tiny"), None, device="cpu")
    manifest = export_embedder(embedder, tmp_path)
    assert manifest.dim == 32 and manifest.head_files["scene"] == "head.onnx"
    assert check_export(embedder, tmp_path, "onnxruntime", batch=2) >= MIN_COSINE


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_check_export_passes_for_the_model_exported(shared, runtime):
    embedder, out_dir, _ = shared
    assert MIN_COSINE <= check_export(embedder, out_dir, runtime, batch=3) <= 1.0 + 1e-6


def test_check_export_refuses_another_models_vectors(shared):
    _, out_dir, _ = shared
    # Same fingerprint (no head checksum recorded), other weights: only the vector check can tell.
    twin = _embedder(seed=2, head_sha256="head-sha")
    with pytest.raises(ExportMismatch, match="min cosine") as raised:
        check_export(twin, out_dir, "onnxruntime", batch=3)
    assert isinstance(raised.value, ModelMismatch)


def test_check_export_refuses_an_export_of_another_fingerprint(shared):
    _, out_dir, _ = shared
    with pytest.raises(ExportMismatch, match="another model"):
        check_export(_embedder(head_sha256="other-head"), out_dir, "openvino", batch=1)


def test_a_changed_graph_file_is_refused_at_load(shared, tmp_path):
    _, out_dir, manifest = shared
    for name in [*manifest.files(), MANIFEST_FILE]:
        (tmp_path / name).write_bytes((out_dir / name).read_bytes())
    load_runtime("onnxruntime", tmp_path)  # an exact copy loads
    head = tmp_path / "head.onnx"
    head.write_bytes(head.read_bytes() + b"\0")
    with pytest.raises(ExportMismatch, match="sha256"):
        load_runtime("onnxruntime", tmp_path)
    (tmp_path / "backbone.onnx").unlink()
    with pytest.raises(ExportMismatch, match="missing"):
        load_runtime("openvino", tmp_path)


@pytest.mark.slow
def test_real_lite0_export_matches_torch(tmp_path):
    backbone = load_backbone("efficientnet_lite0")
    torch.manual_seed(0)
    embedder = Embedder(backbone, CompatibilityHead(HeadConfig(in_dim=backbone.dim)), device="cpu", head_sha256="h")
    manifest = export_embedder(embedder, tmp_path)
    assert (manifest.image_size, manifest.backbone_dim, manifest.dim) == (224, 1280, 128)
    assert check_export(embedder, tmp_path, "openvino", batch=2) >= MIN_COSINE
