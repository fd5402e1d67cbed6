"""Exact float k-nearest-neighbour search (brute force): the ground truth and the baseline.

What a user runs to search exactly without an index, so it is what the graph is measured
against on an accelerator (benchmarks/ann_gpu.py) and what gives that benchmark its ground
truth. The base is scored a chunk at a time by one matmul in full float32 (HIGHEST: a GPU's
default TF32 would round the scores an exact search exists for), and each chunk is merged into
a running top-k through hamming's exact group pre-selection (a min over groups of codes, a
top_k over the groups, then over the chosen groups' entries). A plain lax.top_k over each whole
[Q, chunk] tile costs several times the matmul on a GPU (benchmarks/RESULTS.md, run 3), so a
baseline built on it would flatter any index. Memory beyond the inputs is O(Q * chunk) for
any N.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from alijax.ann import hamming
from alijax.ann.search import check_metric

# The [Q, chunk] float32 score tile: on a CPU at most 32 MB and 16384 vectors (2 cores, 1M x
# 128-d, k = 10: Q = 64 took 211 ms a search in chunks of 16384, 372 in chunks of 131072; Q = 512
# 1.39-1.55 s at 16384, 1.69 at 4096, 3.3 at 65536); 1 GB elsewhere (fewer loop trips, each a few
# kernel launches on a GPU).
_TILE_ELEMENTS_CPU = 1 << 23
_CHUNK_CPU = 1 << 14
# ... but a whole base in one chunk where its tile is small (8 MB): a chunk costs a copy of its
# rows and a merge (ms, interleaved medians: 20000 vectors Q = 1 0.94 against 4.62 in chunks of
# 16384, Q = 64 3.83 against 4.40; 200000 Q = 8 18.7 against 21.8; 65536 Q = 64 23.1 against
# 18.6, so not beyond).
_WHOLE_CPU = 1 << 21
_TILE_ELEMENTS = 1 << 28
# Scores a group holds in the exact pre-selection (hamming.merge_chunk).
_GROUP = 32


def default_chunk_size(q: int, n: int, *, cpu: bool | None = None) -> int:
    """Base vectors a chunk scores: a power of two in [1024, 2**20] (2**14 on a CPU), the
    Q x chunk tile within 32 MB on a CPU and 1 GB elsewhere unless the floor of 1024 is more;
    at most n; on a CPU all n where the Q x n tile is at most 8 MB."""
    if cpu is None:
        cpu = jax.default_backend() == "cpu"
    if cpu and max(q, 1) * n <= _WHOLE_CPU:
        return n
    tile, most = (_TILE_ELEMENTS_CPU, _CHUNK_CPU) if cpu else (_TILE_ELEMENTS, 1 << 20)
    chunk = min(most, max(1024, tile // max(q, 1)))
    return min(1 << (chunk.bit_length() - 1), n)


def _distances(queries, chunk, metric: str, precision, centre=None):
    """float32 [Q, C]: smaller is nearer. l2 leaves out |q|^2 (the same for a query's row),
    with the chunk moved by -centre as the queries were; ip and cosine are negated
    similarities (cosine's vectors normalised here)."""
    chunk = chunk.astype(jnp.float32)  # float16 bases: one chunk at a time, never a full copy
    if centre is not None:
        chunk = chunk - centre
    if metric == "cosine":
        chunk = chunk / jnp.maximum(jnp.linalg.norm(chunk, axis=1, keepdims=True), 1e-30)
    dots = lax.dot_general(
        queries,
        chunk,
        (((1,), (1,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    dist = jnp.sum(chunk * chunk, axis=1)[None, :] - 2 * dots if metric == "l2" else -dots
    # A NaN is no neighbour: as +inf it ties with the running list's empty slots, which come
    # first, so it is never returned (lax.top_k's order of NaNs is not specified).
    return jnp.where(jnp.isnan(dist), jnp.inf, dist)


@functools.partial(jax.jit, static_argnames=("k", "metric", "chunk_size", "group", "precision"))
def _exact_search(queries, vectors, *, k, metric, chunk_size, group, precision):
    queries = queries.astype(jnp.float32)
    if metric == "cosine":
        queries = queries / jnp.maximum(jnp.linalg.norm(queries, axis=1, keepdims=True), 1e-30)
    centre = None
    if metric == "l2":
        # |x - q|^2 from the queries' mean, not the origin: |x|^2 - 2 q.x cancelled in float32
        # for data far from the origin (all near 100, neighbours 0.001 apart: recall@10 0.01,
        # every score 0). Moving both by one point changes no distance. The mean is rounded
        # to an integer, so that integer data stay exact (ties stay ties); data near the
        # origin (|mean| < 0.5) stay where they are. A query holding NaN finds nothing and
        # does not move the others.
        mean = jnp.nanmean(jnp.where(jnp.isfinite(queries), queries, jnp.nan), axis=0)
        centre = jnp.round(jnp.where(jnp.isfinite(mean), mean, 0.0))
        queries = queries - centre
    q, n = queries.shape[0], vectors.shape[0]
    merge = functools.partial(hamming.merge_chunk, k=k, group=group)
    best = (jnp.full((q, k), jnp.inf, jnp.float32), jnp.full((q, k), -1, jnp.int32))

    def body(i, best):
        start = i * chunk_size
        chunk = lax.dynamic_slice_in_dim(vectors, start, chunk_size, axis=0)
        return merge(best, _distances(queries, chunk, metric, precision, centre), start)

    n_full = n // chunk_size
    best = lax.fori_loop(0, n_full, body, best)
    if n_full * chunk_size < n:  # a static remainder: the base is never padded or copied
        start = n_full * chunk_size
        best = merge(best, _distances(queries, vectors[start:], metric, precision, centre), start)
    dist, idx = best
    if metric == "l2":  # squared distances, as the index's rerank reports them
        scores = jnp.maximum(dist + jnp.sum(queries * queries, axis=1)[:, None], 0.0)
    else:
        scores = -dist
    missing = jnp.inf if metric == "l2" else -jnp.inf  # the rerank's convention
    return jnp.where(idx < 0, missing, scores), idx


def exact_search(
    queries,
    vectors,
    k: int,
    *,
    metric: str = "l2",
    chunk_size: int | None = None,
    precision=lax.Precision.HIGHEST,
    group: int = _GROUP,
):
    """The exact k nearest of vectors for each query, by brute force.

    Args:
      queries: float [Q, D]; vectors: float [N, D] (float16 is scored in float32); 1 <= k <= N.
      metric: "l2", "ip" or "cosine", as BinaryGraphIndex.
      chunk_size: base vectors scored at a time (default: default_chunk_size(Q, N)).
      precision: of the scoring matmul; HIGHEST is exact float32 on every backend.
      group: scores a group holds in the exact pre-selection; 0 turns it off (a lax.top_k
        over each whole [Q, chunk] tile: the plain brute force, for comparison).
    Returns:
      (scores float32 [Q, k], indices int32 [Q, k]) best first, ties to the lower index: l2
      squared distances ascending (|q|^2 + |x|^2 - 2 q.x, clamped at 0), ip and cosine
      similarities descending. Inputs are not checked for NaN (that would cost a pass and a
      wait for the device); a NaN score counts as no neighbour, as in the index's rerank: a
      vector holding NaN is never returned, and a query holding NaN finds nothing (indices
      -1, scores +inf for l2, -inf for ip and cosine).
    """
    check_metric(metric)
    queries, vectors = jnp.asarray(queries), jnp.asarray(vectors)
    for name, x in (("queries", queries), ("vectors", vectors)):
        if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a float [rows, D] array; got {x.dtype} {x.shape}")
    if queries.shape[1] != vectors.shape[1]:
        raise ValueError(
            f"queries.shape[1]={queries.shape[1]} must equal vectors.shape[1]={vectors.shape[1]}"
        )
    n = vectors.shape[0]
    if not isinstance(k, numbers.Integral) or not 1 <= k <= n:
        raise ValueError(f"k={k!r} must be an int in 1..{n} (the number of vectors)")
    k = int(k)
    chunk = default_chunk_size(queries.shape[0], n) if chunk_size is None else chunk_size
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
    if not isinstance(group, int) or group < 0:
        raise ValueError(f"group={group!r} must be an int >= 0")
    return _exact_search(
        queries,
        vectors,
        k=k,
        metric=metric,
        chunk_size=min(chunk, n),
        group=group,
        precision=precision,
    )
