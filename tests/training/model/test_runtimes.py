"""Every runtime gives torch's vectors (fp32: cosine >= 0.99999, the same top-10 neighbours), each exported
runtime loads without torch, and precision, threads and devices are honoured or refused out loud."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from training.errors import DataError
from training.model.backbones import load_backbone
from training.model.embedder import Embedder
from training.model.export import MIN_COSINE, export_embedder, row_cosines
from training.model.head import CompatibilityHead, HeadConfig
from training.model.runtimes import (
    Runtime,
    RuntimeUnavailable,
    load_runtime,
    onnx_runtime,
    openvino_runtime,
    resolve_name,
)
from training.model.runtimes.torch_runtime import TorchRuntime

EXPORTED = ["onnxruntime", "openvino"]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    backbone = load_backbone("tiny")
    torch.manual_seed(3)
    head = CompatibilityHead(HeadConfig(in_dim=backbone.dim, hidden_dim=24, out_dim=16, separate=True))
    for branch in (head.scene, head.product):
        branch.layers[1].running_mean.uniform_(-1.0, 1.0)
        branch.layers[1].running_var.uniform_(0.5, 2.0)
    return Embedder(backbone, head, device="cpu", head_sha256="head-sha")


@pytest.fixture(scope="module")
def export_dir(embedder, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("export")
    export_embedder(embedder, out_dir)
    return out_dir


def _images(count: int, seed: int) -> np.ndarray:
    """Varied inputs (own contrast and colour cast each), so neighbours are not a near-tie of noise."""
    rng = np.random.default_rng(seed)
    noise = rng.uniform(-1.0, 1.0, (count, 3, 64, 64))
    contrast = rng.uniform(0.1, 1.0, (count, 1, 1, 1))
    cast = rng.uniform(-0.8, 0.8, (count, 3, 1, 1))
    return np.clip(noise * contrast + cast, -1.0, 1.0).astype(np.float32)


def _torch_vectors(embedder: Embedder, images: np.ndarray, kind: str) -> np.ndarray:
    return embedder.embed_batch(torch.from_numpy(images), kind)


@pytest.mark.parametrize("name", EXPORTED)
@pytest.mark.parametrize("batch", [1, 3])
def test_exported_runtime_equals_torch(embedder, export_dir, name, batch):
    runtime = load_runtime(name, export_dir, threads=1)
    assert isinstance(runtime, Runtime) and runtime.name == name and runtime.precision == "f32"
    assert runtime.fingerprint == embedder.fingerprint() and runtime.dim == 16
    images = _images(batch, seed=batch)
    features = runtime.backbone_features(images)
    assert features.dtype == np.float32 and features.shape == (batch, 32)
    np.testing.assert_allclose(features, embedder.backbone_features(torch.from_numpy(images)).numpy(), atol=1e-5)
    for kind in ("scene", "product"):
        vectors = runtime.vectors(images, kind)
        assert vectors.dtype == np.float32 and vectors.shape == (batch, 16)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
        assert row_cosines(vectors, _torch_vectors(embedder, images, kind)).min() >= MIN_COSINE


@pytest.mark.parametrize("name", EXPORTED)
def test_same_top10_neighbours_as_torch(embedder, export_dir, name):
    runtime = load_runtime(name, export_dir)
    catalogue = _images(120, seed=10)
    # Queries are noisy copies of catalogue items, so each has a distinct true neighbour to find.
    noise = np.random.default_rng(11).normal(0.0, 0.05, (8, 3, 64, 64)).astype(np.float32)
    queries = catalogue[::15] + noise
    expected = _torch_vectors(embedder, queries, "product") @ _torch_vectors(embedder, catalogue, "product").T
    scores = runtime.vectors(queries, "product") @ np.concatenate(
        [runtime.vectors(catalogue[start:start + 40], "product") for start in range(0, 120, 40)]).T
    expected_top = np.argsort(-expected, axis=1, kind="stable")[:, :10]
    assert np.array_equal(np.argsort(-scores, axis=1, kind="stable")[:, :10], expected_top)
    assert len(set(expected_top[:, 0])) >= 6  # mostly distinct top hits: a real ranking, not one hub for all


def test_torch_runtime_is_the_embedder(embedder):
    runtime = load_runtime("torch", embedder=embedder)
    assert isinstance(runtime, TorchRuntime) and isinstance(runtime, Runtime)
    images = _images(2, seed=0)
    assert np.array_equal(runtime.vectors(images, "product"), _torch_vectors(embedder, images, "product"))
    assert runtime.fingerprint == embedder.fingerprint()


@pytest.mark.parametrize("name", EXPORTED)
def test_shapes_are_checked_and_empty_batches_are_empty(export_dir, name):
    runtime = load_runtime(name, export_dir)
    assert runtime.backbone_features(np.zeros((0, 3, 64, 64), np.float32)).shape == (0, 32)
    assert runtime.project(np.zeros((0, 32), np.float32), "scene").shape == (0, 16)
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        runtime.backbone_features(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"\[B, 32\]"):
        runtime.project(np.zeros((1, 31), np.float32), "scene")
    with pytest.raises(ValueError, match="kind"):
        runtime.project(np.zeros((1, 32), np.float32), "shoe")
    # float64 input is converted, not misread
    images = _images(1, seed=5)
    np.testing.assert_array_equal(runtime.backbone_features(images.astype(np.float64)),
                                  runtime.backbone_features(images))


def test_openvino_is_told_f32_and_the_thread_count(export_dir):
    # Without the hint OpenVINO runs bf16 on CPUs that have it: the f32 default must be explicit.
    runtime = load_runtime("openvino", export_dir, threads=1)
    compiled = runtime._backbone
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32")
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    assert str(compiled.get_property("PERFORMANCE_HINT")).endswith("LATENCY")


def test_onnxruntime_thread_count_and_provider(export_dir):
    runtime = load_runtime("onnxruntime", export_dir, threads=1, device="cpu")
    assert runtime._backbone.get_session_options().intra_op_num_threads == 1
    assert runtime._backbone.get_providers() == ["CPUExecutionProvider"]


@pytest.mark.skipif(not openvino_runtime.cpu_supports_bf16(), reason="this CPU has no BF16 (AVX-512 BF16 / AMX)")
def test_openvino_bf16_is_close_to_torch(embedder, export_dir):
    runtime = load_runtime("openvino", export_dir, precision="bf16")
    assert runtime.precision == "bf16"
    assert "bfloat16" in str(runtime._backbone.get_property("INFERENCE_PRECISION_HINT"))
    images = _images(4, seed=7)
    cosines = row_cosines(runtime.vectors(images, "scene"), _torch_vectors(embedder, images, "scene"))
    assert 0.99 <= cosines.min() < 1.0  # close, and really computed in lower precision (not exact)


def test_bf16_is_refused_where_the_cpu_lacks_it(export_dir, monkeypatch):
    monkeypatch.setattr(openvino_runtime, "cpu_supports_bf16", lambda core=None: False)
    with pytest.raises(RuntimeUnavailable, match="bf16 needs a CPU"):
        load_runtime("openvino", export_dir, precision="bf16")
    with pytest.raises(RuntimeUnavailable, match="f32 only"):
        load_runtime("onnxruntime", export_dir, precision="bf16")
    with pytest.raises(DataError, match="unknown precision"):
        load_runtime("openvino", export_dir, precision="fp8")


def test_devices_are_refused_out_loud(export_dir, monkeypatch):
    monkeypatch.setattr(onnx_runtime.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(RuntimeUnavailable, match="CUDAExecutionProvider"):
        load_runtime("onnxruntime", export_dir, device="cuda")
    assert onnx_runtime.providers_for("auto") == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeUnavailable, match="cpu"):
        load_runtime("openvino", export_dir, device="cuda")


def test_load_runtime_names(embedder, export_dir, monkeypatch):
    assert resolve_name("auto", "cpu") == "openvino"
    assert resolve_name("auto", "cuda") == "onnxruntime"
    assert load_runtime("auto", export_dir).name == "openvino"
    with pytest.raises(DataError, match="unknown runtime"):
        load_runtime("tensorrt", export_dir)
    with pytest.raises(DataError, match="embedder="):
        load_runtime("torch", export_dir)
    with pytest.raises(DataError, match="export_dir="):
        load_runtime("openvino")
    with pytest.raises(DataError, match="manifest.json"):
        load_runtime("openvino", export_dir / "nowhere")
    import training.model.runtimes as runtimes

    monkeypatch.setattr(runtimes, "_installed", lambda package: package == "torch")
    assert resolve_name("auto", "cpu", embedder) == "torch"
    with pytest.raises(RuntimeUnavailable, match="install openvino or onnxruntime"):
        resolve_name("auto", "cpu")


def test_openvino_from_many_threads_gives_each_its_own_answer(export_dir):
    runtime = load_runtime("openvino", export_dir, threads=1)
    inputs = [_images(2, seed=20 + index) for index in range(4)]
    expected = [runtime.vectors(images, "scene") for images in inputs]
    results: dict[int, list[np.ndarray]] = {index: [] for index in range(4)}

    def work(index: int) -> None:
        for _ in range(20):
            results[index].append(runtime.vectors(inputs[index], "scene"))

    threads = [threading.Thread(target=work, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(4):
        assert len(results[index]) == 20
        assert all(np.array_equal(vectors, expected[index]) for vectors in results[index])


@pytest.mark.parametrize("name", EXPORTED)
def test_exported_runtime_serves_an_image_without_torch(embedder, export_dir, name):
    """The serving path: decode, to_array, load_runtime, vectors, in a process that never imports torch."""
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from PIL import Image
        from training.model.arrays import Preprocess, to_array
        from training.model.runtimes import load_runtime
        runtime = load_runtime({name!r}, sys.argv[1], threads=1)
        spec = Preprocess.from_dict(runtime.fingerprint["preprocess"])
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8))
        batch = np.stack([to_array(image, (0.1, 0.2, 0.8, 0.9), spec)])
        np.save(sys.argv[2], runtime.vectors(batch, "scene"))
        assert "torch" not in sys.modules, sorted(name for name in sys.modules if "torch" in name)
    """)
    out = export_dir.parent / f"served-{name}.npy"
    subprocess.run([sys.executable, "-c", code, str(export_dir), str(out)], check=True)
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8))
    reference = embedder.embed([image], [(0.1, 0.2, 0.8, 0.9)], "scene")
    assert row_cosines(np.load(out), reference).min() >= MIN_COSINE
