"""Building one category's FAISS index: exact inner product when small, IVF (or HNSW) when large.

faiss ids are row positions in the category's vector array; the artifact keeps the id array beside it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import faiss
import numpy as np
from tqdm import tqdm

LOG = logging.getLogger(__name__)

# Measured (benchmarks/bench_index.py, 2 CPU cores, dim 128): a flat scan of the largest STL category
# (11,780 vectors) answers one query well under 1 ms, so every real category stays exact; above this
# the flat scan grows linearly and IVF takes over.
DEFAULT_EXACT_THRESHOLD = 50_000
DEFAULT_APPROXIMATE = "ivf"
RECALL_K = 50
RECALL_TARGET = 0.95
# Tuning aims a little above the target: tuning queries are the category's own vectors (left out of
# their own results), while real queries come from scene crops.
TUNE_MARGIN = 0.02
ADD_CHUNK = 65_536
# Scene queries sit farther from the catalogue than the tuning queries do; a floor on nprobe costs
# little (a few hundred extra rows per probe) and guards against tuning on too-easy queries.
MIN_NPROBE = 8

Approximate = Literal["ivf", "hnsw"]


@dataclass(frozen=True)
class IndexSpec:
    factory: str  # faiss.index_factory string
    kind: Literal["exact", "approximate"]
    search_params: dict[str, int] = field(default_factory=dict)


def apply_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Set nprobe / efSearch (whatever the manifest recorded) through faiss's generic parameter space."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def gpu_available() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def ivf_nlist(count: int) -> int:
    """Inverted lists for `count` vectors: a power of two near 4*sqrt(n), with >= 39 training points each."""
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(count))))
    return int(max(1, min(nlist, 65_536, count // 39)))


def choose_spec(count: int, exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
                approximate: Approximate = DEFAULT_APPROXIMATE) -> IndexSpec:
    if count <= exact_threshold:
        return IndexSpec("Flat", "exact")
    if approximate == "hnsw":
        return IndexSpec("HNSW32,Flat", "approximate", {"efSearch": 128})
    if approximate != "ivf":
        raise ValueError(f"unknown approximate index family {approximate!r}; use ivf or hnsw")
    return IndexSpec(f"IVF{ivf_nlist(count)},Flat", "approximate", {"nprobe": 32})


def build_index(vectors: np.ndarray, spec: IndexSpec, seed: int = 0, progress: bool = False,
                use_gpu: bool | None = None) -> faiss.Index:
    """A CPU index over `vectors` ([n, d] float32 unit rows), trained on them when the type needs it."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count, dim = vectors.shape
    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    if spec.factory.startswith("HNSW"):
        # A wider construction beam than faiss' default 40 buys recall at the same efSearch.
        faiss.downcast_index(index).hnsw.efConstruction = 80
    use_gpu = gpu_available() if use_gpu is None else use_gpu
    # HNSW has no faiss GPU implementation; IVF and Flat train/add on the GPU and come back to the CPU.
    on_gpu = use_gpu and not spec.factory.startswith("HNSW")
    resources = None
    if on_gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    if not index.is_trained:
        index.train(_training_sample(vectors, spec, seed))
    chunks = range(0, count, ADD_CHUNK)
    for start in tqdm(chunks, desc=f"add {spec.factory}", unit="chunk", disable=not progress or len(chunks) < 2):
        index.add(vectors[start:start + ADD_CHUNK])
    if on_gpu:
        index = faiss.index_gpu_to_cpu(index)
    apply_search_params(index, spec.search_params)
    LOG.debug("built %s over %d x %d vectors (gpu=%s)", spec.factory, count, dim, on_gpu)
    return index


def _training_sample(vectors: np.ndarray, spec: IndexSpec, seed: int) -> np.ndarray:
    # k-means cost grows with the sample, and ~64 points per centroid already place the centroids well.
    if not spec.factory.startswith("IVF"):
        return vectors
    nlist = int(spec.factory[3:].split(",", 1)[0])
    size = min(len(vectors), 64 * nlist)
    if size == len(vectors):
        return vectors
    rows = np.random.default_rng(seed).choice(len(vectors), size=size, replace=False)
    return vectors[np.sort(rows)]


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row ids [nq, k] of the exact top-k by inner product (ground truth for recall)."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k found in its returned top-k."""
    if len(truth) == 0:
        return 1.0
    hits = sum(len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth, strict=True))
    return hits / float(sum(int((t >= 0).sum()) for t in truth))


def tuning_rows(count: int, sample: int = 256, seed: int = 0) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(count, size=min(sample, count), replace=False))


def tuning_queries(vectors: np.ndarray, count: int = 256, seed: int = 0) -> np.ndarray:
    """A sample of the category's own vectors, used as leave-one-out queries."""
    return np.ascontiguousarray(vectors[tuning_rows(len(vectors), count, seed)], dtype=np.float32)


def leave_one_out_recall(index: faiss.Index, vectors: np.ndarray, rows: np.ndarray, k: int) -> float:
    """Recall@k of `index` against exact search, querying with stored rows and ignoring each row itself.

    A stored vector queried as if it were held out behaves like a new query from the same distribution;
    querying with it and counting itself would make every index look perfect.
    """
    k = min(k, len(vectors) - 1)
    if k < 1:
        return 1.0
    queries = np.ascontiguousarray(vectors[rows], dtype=np.float32)

    def without_self(found: np.ndarray) -> np.ndarray:
        pad = np.full(1, -1, found.dtype)
        return np.stack([np.concatenate([f[f != row], pad])[:k] for f, row in zip(found, rows, strict=True)])

    truth = without_self(exact_neighbours(vectors, queries, k + 1))
    return recall_at_k(without_self(index.search(queries, k + 1)[1]), truth)


def tune_search_params(index: faiss.Index, vectors: np.ndarray, spec: IndexSpec, k: int = RECALL_K,
                       target: float = RECALL_TARGET + TUNE_MARGIN, seed: int = 0) -> tuple[dict[str, int], float]:
    """Smallest nprobe / efSearch reaching `target` leave-one-out recall@k against exact search."""
    if spec.kind == "exact":
        return {}, 1.0
    rows = tuning_rows(len(vectors), seed=seed)
    if spec.factory.startswith("IVF"):
        name, limit = "nprobe", faiss.extract_index_ivf(index).nlist
        candidates = sorted({min(limit, max(MIN_NPROBE, 2**i)) for i in range(int(math.log2(limit)) + 1)})
    else:
        name = "efSearch"
        candidates = [max(k + 1, 2**i) for i in range(4, 12)]
    recall = 0.0
    for value in candidates:
        apply_search_params(index, {name: value})
        recall = leave_one_out_recall(index, vectors, rows, k)
        if recall >= target:
            break
    LOG.info("%s: %s=%d gives leave-one-out recall@%d %.4f on %d queries", spec.factory, name, value, k, recall,
             len(rows))
    return {name: value}, recall
