"""alijax.ann.exact: brute-force float search against float64 numpy, ties to the lower index."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alijax.ann.exact import default_chunk_size, exact_search


def np_exact(queries, vectors, k, metric):
    """float64 scores and the k best indices, ties to the lower index."""
    q, x = queries.astype(np.float64), vectors.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    if metric == "l2":
        dist = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    else:
        dist = -(q @ x.T)
    idx = np.stack([np.lexsort((np.arange(len(x)), row))[:k] for row in dist])
    best = np.take_along_axis(dist, idx, axis=1)
    return (best if metric == "l2" else -best), idx


def tied_vectors(rng, n, d, distinct):
    """Small integers (exact in float32 products) drawn from a few distinct rows: many ties."""
    pool = rng.integers(-3, 4, (distinct, d)).astype(np.float32)
    return pool[rng.integers(0, distinct, n)]


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize(
    "n, k, chunk",
    [
        (1000, 3, 128),  # grouped pre-selection (4 groups of 32 > k), a remainder of 104
        (1000, 5, 96),  # 3 groups <= k: the plain merge, a remainder of 40
        (300, 300, 64),  # k = N
        (257, 7, None),  # one chunk
    ],
)
def test_exact_with_ties_against_float64(metric, n, k, chunk):
    rng = np.random.default_rng(n + k)
    vectors = tied_vectors(rng, n, 16, distinct=40)
    queries = tied_vectors(rng, 9, 16, distinct=5)
    scores, idx = exact_search(queries, vectors, k, metric=metric, chunk_size=chunk)
    want_scores, want_idx = np_exact(queries, vectors, k, metric)
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    np.testing.assert_array_equal(np.asarray(scores), want_scores.astype(np.float32))


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_random_floats_and_float16_base(metric):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((2000, 24)).astype(np.float16)
    queries = rng.standard_normal((33, 24)).astype(np.float32)
    scores, idx = exact_search(queries, vectors, 10, metric=metric, chunk_size=512)
    want_scores, want_idx = np_exact(queries, vectors.astype(np.float32), 10, metric)
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("chunk", [1024, 1000, None])  # grouped, plain, one chunk
def test_nan_vectors_are_never_returned_and_nan_queries_find_nothing(chunk, metric):
    rng = np.random.default_rng(5)
    vectors = rng.random((3000, 8)).astype(np.float32)
    vectors[[3, 1500]] = np.nan
    queries = vectors[[3, 4, 1500, 7]].copy()
    scores, idx = exact_search(queries, vectors, 5, metric=metric, chunk_size=chunk)
    idx, scores = np.asarray(idx), np.asarray(scores)
    missing = np.inf if metric == "l2" else -np.inf
    assert (idx[[0, 2]] == -1).all() and (scores[[0, 2]] == missing).all()
    clean = vectors.copy()
    clean[[3, 1500]] = 1e6 if metric == "l2" else -1e6  # what NaN rows must behave as: worst
    want = np_exact(queries[[1, 3]], clean, 5, metric)[1]
    np.testing.assert_array_equal(idx[[1, 3]], want)


def test_errors_name_the_argument():
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(ValueError, match="metric"):
        exact_search(x, x, 3, metric="hamming")
    with pytest.raises(ValueError, match="k="):
        exact_search(x, x, 11)
    with pytest.raises(ValueError, match="k="):
        exact_search(x, x, 0)
    with pytest.raises(ValueError, match=r"queries.shape\[1\]"):
        exact_search(x[:, :3], x, 3)
    with pytest.raises(ValueError, match="vectors must be a float"):
        exact_search(x, x.astype(np.int32), 3)
    with pytest.raises(ValueError, match="chunk_size"):
        exact_search(x, x, 3, chunk_size=0)


def test_memory_stays_a_chunk_for_any_n():
    """2**20 vectors, 64 queries: the whole score matrix would be 256 MB; the compiled search's
    temporaries stay within a few chunk tiles (compiled, never run)."""
    queries = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    vectors = jax.ShapeDtypeStruct((1 << 20, 128), jnp.float32)
    chunk = default_chunk_size(64, 1 << 20, cpu=True)
    assert chunk == 1 << 14
    compiled = (
        jax.jit(lambda q, x: exact_search(q, x, 10, chunk_size=chunk)).lower(queries, vectors)
    ).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 4 * 64 * chunk * 4, temp


def test_default_chunk_size():
    assert default_chunk_size(1, 10**6, cpu=True) == 10**6  # a small tile: one chunk
    assert default_chunk_size(64, 20_000, cpu=True) == 20_000
    assert default_chunk_size(64, 65_536, cpu=True) == 1 << 14
    assert default_chunk_size(8, 10**6, cpu=True) == 1 << 14
    assert default_chunk_size(512, 10**6, cpu=True) == 1 << 14
    assert default_chunk_size(10_000, 10**6, cpu=True) == 1024  # the floor (tile 40 MB)
    assert default_chunk_size(10_000, 10**6, cpu=False) == 1 << 14  # 1 GB / 10000 -> 16384
    assert default_chunk_size(1, 10**7, cpu=False) == 1 << 20
    assert default_chunk_size(1, 300, cpu=True) == 300


def test_data_far_from_the_origin_keep_their_digits():
    # |x|^2 - 2 q.x cancelled in float32 here (all near 100, neighbours ~0.001 apart): recall@10
    # was 0.01 and every score 0. From the queries' mean the distances keep their digits.
    rng = np.random.default_rng(6)
    vectors = (100 + 0.01 * rng.standard_normal((2000, 16))).astype(np.float32)
    queries = vectors[:20] + np.float32(0.001) * rng.standard_normal((20, 16)).astype(np.float32)
    scores, idx = exact_search(queries, vectors, 10)
    want_scores, want_idx = np_exact(queries, vectors, 10, "l2")
    assert (np.asarray(idx)[:, 0] == want_idx[:, 0]).all()
    assert np.mean(np.asarray(idx) == want_idx) > 0.95
    np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-2)
