"""alijax.ann.hamming: bit packing order, and hamming_topk (chunked jnp path on CPU, the Pallas
kernel on a GPU) against an exact numpy reference and faiss IndexBinaryFlat."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alijax.ann.hamming import (
    default_chunk_size,
    hamming_topk,
    hamming_topk_chunked,
    pack_bits,
    unpack_bits,
)


def np_topk(queries, codes, k):
    x = queries[:, None, :] ^ codes[None, :, :]
    d = np.unpackbits(x.view(np.uint8), axis=-1).reshape(*x.shape[:2], -1).sum(-1)
    idx = np.stack([np.lexsort((np.arange(len(codes)), row))[:k] for row in d])
    return np.take_along_axis(d, idx, axis=1), idx


def random_codes(rng, n, w, distinct=None):
    pool = rng.integers(0, 2**32, (distinct or n, w), dtype=np.uint32)
    return pool if distinct is None else pool[rng.integers(0, distinct, n)]


class TestPacking:
    def test_documented_bit_order(self):
        bits = np.zeros((2, 64), bool)
        bits[0, 0] = bits[0, 33] = bits[1, 31] = bits[1, 63] = True
        words = np.asarray(pack_bits(bits))
        np.testing.assert_array_equal(words, np.array([[1, 2], [2**31, 2**31]], np.uint32))

    @settings(max_examples=25, deadline=None)
    @given(rows=st.integers(1, 5), n_words=st.integers(1, 4), seed=st.integers(0, 2**31))
    def test_roundtrip_and_bit_counts(self, rows, n_words, seed):
        rng = np.random.default_rng(seed)
        bits = rng.random((rows, 32 * n_words)) < rng.random()
        words = np.asarray(pack_bits(bits))
        assert words.dtype == np.uint32 and words.shape == (rows, n_words)
        # Set-bit counts agree with numpy's per-byte unpacking (little-endian words).
        np.testing.assert_array_equal(
            np.unpackbits(words.view(np.uint8), axis=-1).sum(-1), bits.sum(-1)
        )
        np.testing.assert_array_equal(np.asarray(unpack_bits(words)), bits)
        np.testing.assert_array_equal(
            np.asarray(unpack_bits(words, 32 * n_words - 3)), bits[:, :-3]
        )

    def test_packing_errors(self):
        with pytest.raises(ValueError, match="bits.shape"):
            pack_bits(np.zeros((2, 33), bool))
        with pytest.raises(ValueError, match="words.dtype"):
            unpack_bits(np.zeros((2, 1), np.int32))
        with pytest.raises(ValueError, match="n_bits"):
            unpack_bits(np.zeros((2, 1), np.uint32), 40)


class TestHammingTopk:
    @pytest.mark.parametrize(
        "q,n,w,k,chunk,distinct",
        [
            (7, 1000, 8, 10, 128, 9),  # chunk does not divide N, many ties across chunks
            (3, 50, 1, 50, 16, None),  # k = N
            (5, 40, 2, 12, 5, 3),  # chunk < k
            (64, 3000, 4, 1, None, 40),  # default chunk
        ],
    )
    def test_exact_with_ties(self, q, n, w, k, chunk, distinct):
        rng = np.random.default_rng([q, n, w, k])
        queries, codes = random_codes(rng, q, w), random_codes(rng, n, w, distinct)
        d, i = hamming_topk(queries, codes, k, chunk_size=chunk)
        want_d, want_i = np_topk(queries, codes, k)
        np.testing.assert_array_equal(np.asarray(d), want_d)
        np.testing.assert_array_equal(np.asarray(i), want_i)

    def test_agrees_with_faiss(self):
        faiss = pytest.importorskip("faiss")
        rng = np.random.default_rng(4)
        queries, codes = random_codes(rng, 20, 8), random_codes(rng, 5000, 8)
        index = faiss.IndexBinaryFlat(256)
        index.add(codes.view(np.uint8))  # little-endian words -> the same bits as bytes
        fd, fi = index.search(queries.view(np.uint8), 10)
        d, i = hamming_topk(queries, codes, 10)
        np.testing.assert_array_equal(np.asarray(d), fd)
        # faiss's order among equal distances is its own: compare the index sets per distance.
        for row_d, row_i, row_fi in zip(np.asarray(d), np.asarray(i), fi):
            last = row_d[-1]
            np.testing.assert_array_equal(
                np.sort(row_i[row_d < last]), np.sort(row_fi[row_d < last])
            )

    def test_errors(self):
        q, c = np.ones((2, 4), np.uint32), np.ones((10, 4), np.uint32)
        with pytest.raises(ValueError, match="k=11"):
            hamming_topk(q, c, 11)
        with pytest.raises(ValueError, match="codes.dtype"):
            hamming_topk(q, c.astype(np.int64), 3)
        with pytest.raises(ValueError, match="chunk_size"):
            hamming_topk(q, c, 3, chunk_size=0)

    def test_default_chunk_keeps_tile_small(self):
        for q in (1, 64, 512, 4096):
            chunk = default_chunk_size(q, 10**7)
            assert chunk & (chunk - 1) == 0
            assert q * chunk <= 1 << 23 or chunk == 256  # ~32 MB of int32 distances per tile


@pytest.mark.gpu
class TestHammingTopkGpu:
    def test_gpu_dispatch_matches_chunked_path(self):
        assert jax.default_backend() == "gpu"
        rng = np.random.default_rng(8)
        queries, codes = random_codes(rng, 50, 8), random_codes(rng, 100_000, 8, 2000)
        got = hamming_topk(queries, codes, 10)
        want = hamming_topk_chunked(queries, codes, 10, chunk_size=8192)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("group", [0, 4, 16])
@pytest.mark.parametrize("chunk", [64, 96, 1000])
def test_grouped_preselection_is_exact_with_ties(group, chunk):
    # Few distinct codes: many equal distances, so the (distance, index) tie-break decides.
    rng = np.random.default_rng([group, chunk])
    queries = random_codes(rng, 6, 2, distinct=3)
    codes = random_codes(rng, 1000, 2, distinct=5)
    got = hamming_topk_chunked(queries, codes, 9, chunk_size=chunk, group=group)
    want = np_topk(queries, codes, 9)
    np.testing.assert_array_equal(np.asarray(got[0]), want[0])
    np.testing.assert_array_equal(np.asarray(got[1]), want[1])
