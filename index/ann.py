"""Building one category's FAISS index: exact inner product when small, IVF (or HNSW) when large, compressed
(IVF + SQ8 or PQ codes) when a memory budget says the float vectors would not fit.

faiss ids are row positions in the category's vector array; the artifact keeps the id array beside it (and
the float vectors, which the service does not load: `rerank` re-scores candidates from them).
"""

from __future__ import annotations

import logging
import math
import re
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
# Exact search scans at most this many rows at once (256 queries x 262,144 rows of scores: 256 MB).
EXACT_CHUNK = 262_144
# Scene queries sit farther from the catalogue than the tuning queries do; a floor on nprobe costs
# little (a few hundred extra rows per probe) and guards against tuning on too-easy queries.
MIN_NPROBE = 8

# Compressed codes tried when the budget rules out float vectors, best recall first: bytes per dimension.
# SQ8 keeps 1 byte a dimension (recall near IVF-Flat's); PQ keeps d/2, d/4, d/8 one-byte sub-codes.
COMPRESSED_CODES = ("SQ8", "PQ/2", "PQ/4", "PQ/8")
ID_BYTES = 8  # an IVF list stores an int64 id beside each code
HNSW_LINK_BYTES = 2 * 32 * 4  # HNSW32: ~64 int32 links per vector on level 0
# A compressed code's recall stops growing with nprobe well below the target; past this gain per doubling
# more probes only cost latency.
PLATEAU_GAIN = 0.003
# faiss wants ~39 training points per centroid: PQ's 256 per sub-quantizer, IVF's nlist.
PQ_MIN_COUNT = 39 * 256
# Re-ranking a compressed index (the service, benchmarks/bench_compressed.py): its best rerank_pool(k) rows by
# code are re-scored from the float vectors. Measured (benchmarks/results/compressed.json, 2 cores): 200
# candidates lift recall@50 of SQ8 / PQ64 / PQ32 / PQ16 from 0.98 / 0.88 / 0.63 / 0.39 to 1.0 / 1.0 / 0.985 /
# 0.83 at 1M x 128 and from 0.97 / 0.82 / 0.45 / 0.19 to 0.985 / 0.985 / 0.82 / 0.44 at 10M, for ~0.15 ms a
# query; the coarse codes want more (10M: PQ32 0.996 with 1000, PQ16 0.94 with 2000; STL_RERANK_CANDIDATES).
RERANK_CANDIDATES = 200
RERANK_FACTOR = 4
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)

Approximate = Literal["ivf", "hnsw"]


class OverBudget(ValueError):
    """Even the smallest compressed index of a category would not fit its memory budget."""


def parse_size(text: str) -> int:
    """Bytes of a size such as "2GB", "512MiB", "1.5g" or "1000000" (k/m/g/t are powers of 1024)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r}; write e.g. 2GB or 512MB")
    number, unit = float(match[1]), match[2].lower().rstrip("b").rstrip("i")
    return int(number * 1024 ** ("kmgt".index(unit) + 1 if unit else 0))


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


def index_bytes(factory: str, count: int, dim: int) -> int:
    """Memory a loaded index of `factory` over `count` vectors takes (codes, ids, links, centroids; estimate)."""
    per_vector = {"Flat": 4 * dim}.get(factory)
    overhead = 0
    if per_vector is None and factory.startswith("HNSW"):
        per_vector = 4 * dim + HNSW_LINK_BYTES
    elif per_vector is None:
        match = re.fullmatch(r"IVF(\d+),(Flat|SQ8|PQ(\d+)(?:x8)?(?:np)?)", factory)
        if not match:
            raise ValueError(f"no memory estimate for index {factory!r}")
        code = {"Flat": 4 * dim, "SQ8": dim}.get(match[2], int(match[3] or 0))
        per_vector = code + ID_BYTES
        overhead = int(match[1]) * dim * 4 + (256 * dim * 4 if match[3] else 0)  # centroids, PQ codebooks
    return count * per_vector + overhead


def compressed_specs(count: int, dim: int) -> list[IndexSpec]:
    """The compressed IVF indexes for `count` vectors of `dim`, largest (best recall) first."""
    nlist = ivf_nlist(count)
    specs: list[IndexSpec] = []
    if count < 39 * 2:  # too few to train even two lists
        return specs
    for code in COMPRESSED_CODES:
        if code == "SQ8":
            specs.append(IndexSpec(f"IVF{nlist},SQ8", "approximate", {"nprobe": 32}))
            continue
        m = dim // int(code.split("/")[1])
        if m >= 1 and dim % m == 0 and count >= PQ_MIN_COUNT:
            # "np": no polysemous training, which only permutes the codes for Hamming filtering (never used here)
            # and took most of a PQ build (12 of 15 s for 10,000 x 16).
            specs.append(IndexSpec(f"IVF{nlist},PQ{m}x8np", "approximate", {"nprobe": 32}))
    return specs


def choose_spec(count: int, exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
                approximate: Approximate = DEFAULT_APPROXIMATE, dim: int | None = None,
                memory_budget: int | None = None) -> IndexSpec:
    """Flat up to `exact_threshold`, else IVF-Flat (or HNSW); with `memory_budget` (bytes, needs `dim`) the
    first of those and then `compressed_specs` that fits. OverBudget when none does."""
    spec = _float_spec(count, exact_threshold, approximate)
    if memory_budget is None:
        return spec
    if dim is None:
        raise ValueError("a memory budget needs the vectors' dimension")
    candidates = [spec, *compressed_specs(count, dim)]
    for candidate in candidates:
        if index_bytes(candidate.factory, count, dim) <= memory_budget:
            if candidate is not spec:
                LOG.info("%d x %d vectors: %s (%.0f MB) exceeds the budget of %.0f MB; using %s (%.0f MB)", count,
                         dim, spec.factory, index_bytes(spec.factory, count, dim) / 2**20, memory_budget / 2**20,
                         candidate.factory, index_bytes(candidate.factory, count, dim) / 2**20)
            return candidate
    smallest = candidates[-1]
    raise OverBudget(f"{count} vectors of dim {dim} need at least {index_bytes(smallest.factory, count, dim)} bytes "
                     f"({smallest.factory}); the budget is {memory_budget} bytes")


def _float_spec(count: int, exact_threshold: int, approximate: Approximate) -> IndexSpec:
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
        index.train(training_sample(vectors, spec, seed))
    chunks = range(0, count, ADD_CHUNK)
    for start in tqdm(chunks, desc=f"add {spec.factory}", unit="chunk", disable=not progress or len(chunks) < 2):
        index.add(vectors[start:start + ADD_CHUNK])
    if on_gpu:
        index = faiss.index_gpu_to_cpu(index)
    apply_search_params(index, spec.search_params)
    LOG.debug("built %s over %d x %d vectors (gpu=%s)", spec.factory, count, dim, on_gpu)
    return index


def training_sample(vectors: np.ndarray, spec: IndexSpec, seed: int) -> np.ndarray:
    """The rows an index of `spec` is trained on (all of them for Flat and HNSW)."""
    # k-means cost grows with the sample, and ~64 points per centroid already place the centroids well.
    if not spec.factory.startswith("IVF"):
        return vectors
    nlist = int(spec.factory[3:].split(",", 1)[0])
    # PQ codebooks have 256 centroids per sub-quantizer and want ~100 points each, whatever nlist is.
    size = min(len(vectors), max(64 * nlist, 25_600 if ",PQ" in spec.factory else 0))
    if size == len(vectors):
        return vectors
    rows = np.random.default_rng(seed).choice(len(vectors), size=size, replace=False)
    return vectors[np.sort(rows)]


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row ids [nq, k] of the exact top-k by inner product (ground truth for recall).

    Past EXACT_CHUNK rows the vectors are scanned a chunk at a time, so a memory map of 10M stored vectors is
    searched without a second copy of them in RAM."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if len(vectors) <= EXACT_CHUNK:
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return flat.search(queries, k)[1]
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start in range(0, len(vectors), EXACT_CHUNK):
        chunk = np.ascontiguousarray(vectors[start:start + EXACT_CHUNK], dtype=np.float32)
        scores, rows = faiss.knn(queries, chunk, min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, rows + start)
    heap.finalize()
    return heap.I


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


def leave_one_out_recall(index: faiss.Index, vectors: np.ndarray, rows: np.ndarray, k: int,
                         rerank_candidates: int = 0, truth: np.ndarray | None = None) -> float:
    """Recall@k of `index` against exact search, querying with stored rows and ignoring each row itself.

    A stored vector queried as if it were held out behaves like a new query from the same distribution;
    querying with it and counting itself would make every index look perfect. With `rerank_candidates` the
    index's best `rerank_pool(k + 1, rerank_candidates)` are re-scored from `vectors` first, as the service
    does. `truth`: `exact_neighbours(vectors, vectors[rows], k + 1)` when the caller has it already.
    """
    k = min(k, len(vectors) - 1)
    if k < 1:
        return 1.0
    queries = np.ascontiguousarray(vectors[rows], dtype=np.float32)

    def without_self(found: np.ndarray) -> np.ndarray:
        pad = np.full(1, -1, found.dtype)
        return np.stack([np.concatenate([f[f != row], pad])[:k] for f, row in zip(found, rows, strict=True)])

    if truth is None:
        truth = exact_neighbours(vectors, queries, k + 1)
    if rerank_candidates:
        pool = index.search(queries, min(len(vectors), rerank_pool(k + 1, rerank_candidates)))[1]
        found = np.stack([_padded(rerank(vectors, query, candidates, k + 1)[1], k + 1)
                          for query, candidates in zip(queries, pool, strict=True)])
    else:
        found = index.search(queries, k + 1)[1]
    return recall_at_k(without_self(found), without_self(truth))


def _padded(rows: np.ndarray, k: int) -> np.ndarray:
    return np.concatenate([rows, np.full(max(0, k - len(rows)), -1, rows.dtype)])


def tune_search_params(index: faiss.Index, vectors: np.ndarray, spec: IndexSpec, k: int = RECALL_K,
                       target: float = RECALL_TARGET + TUNE_MARGIN, seed: int = 0,
                       rerank_candidates: int = RERANK_CANDIDATES) -> tuple[dict[str, int], float]:
    """Smallest nprobe / efSearch reaching `target` leave-one-out recall@k against exact search.

    A compressed index is tuned for the recall the service serves: re-ranked from the float vectors
    (`rerank_candidates`; 0: the codes' own ranking). More probes keep helping after re-ranking where the
    codes' own recall has long stopped growing."""
    if spec.kind == "exact":
        return {}, 1.0
    rows = tuning_rows(len(vectors), seed=seed)
    if spec.factory.startswith("IVF"):
        name, limit = "nprobe", faiss.extract_index_ivf(index).nlist
        candidates = sorted({min(limit, max(MIN_NPROBE, 2**i)) for i in range(int(math.log2(limit)) + 1)})
    else:
        name = "efSearch"
        candidates = [max(k + 1, 2**i) for i in range(4, 12)]
    compressed = is_compressed(spec.factory)
    reranked = rerank_candidates if compressed else 0
    # One exact scan for every candidate value (at 10M rows each scan is seconds).
    truth = exact_neighbours(vectors, vectors[rows], min(k, len(vectors) - 1) + 1)
    recall, chosen = 0.0, candidates[0]
    for value in candidates:
        apply_search_params(index, {name: value})
        previous, recall = recall, leave_one_out_recall(index, vectors, rows, k, reranked, truth)
        if compressed and value != candidates[0] and recall - previous < PLATEAU_GAIN:
            recall = previous  # the codes, not the probes, limit recall here: keep the cheaper search
            break
        chosen = value
        if recall >= target:
            break
    value = chosen
    apply_search_params(index, {name: value})
    LOG.info("%s: %s=%d gives leave-one-out recall@%d %.4f on %d queries%s", spec.factory, name, value, k, recall,
             len(rows), f" (re-ranked from {reranked} candidates)" if reranked else "")
    return {name: value}, recall


def is_compressed(factory: str) -> bool:
    """Whether an index of `factory` scores its rows by lossy codes (SQ8, PQ), so re-ranking its answers from the
    stored float vectors changes them; Flat, IVF-Flat and HNSW store the floats themselves."""
    return "," in factory and not factory.rsplit(",", 1)[1].startswith("Flat")


def rerank_pool(k: int, candidates: int = RERANK_CANDIDATES) -> int:
    """How many of a compressed index's best rows to re-score for the exact best k."""
    return max(RERANK_FACTOR * k, candidates)


def rerank(vectors: np.ndarray, query: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact (scores, rows) of the best k of candidate `rows` ([n] ids, -1 ignored) for one query [d].

    `vectors` may be a memory map of the category's stored float vectors (np.load(mmap_mode="r")): only the
    candidates' rows are read, so a compressed index plus this keeps RAM at the codes' size.
    """
    rows = np.asarray(rows, dtype=np.int64).ravel()
    if len(rows) > 1 and not bool(np.all(rows[1:] > rows[:-1])):  # a filter's rows come sorted already
        rows = np.unique(rows)  # sorted: a memory map is read front to back
    rows = rows[rows >= 0]
    # einsum, not @: numpy's BLAS starts its own threads for a large product, and on cores that serve other
    # requests they wait for each other (10,000 rows: 15.7 ms against 0.2 ms in one thread, 2 busy cores).
    scores = np.einsum("ij,j->i", np.asarray(vectors[rows], dtype=np.float32),
                       np.asarray(query, dtype=np.float32).reshape(-1))
    if len(scores) > k > 0:
        # Only the rows reaching the k-th best score are sorted (all of them that tie with it, so the tie rule holds).
        keep = scores >= np.partition(scores, len(scores) - k)[len(scores) - k]
        rows, scores = rows[keep], scores[keep]
    order = np.lexsort((rows, -scores))[:k]
    return scores[order], rows[order]
