"""Hamming distance and fused Hamming top-k against an exact numpy reference, ties included.

Each test class runs twice: interpret=True on CPU, and compiled (interpret=False) on a GPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.hamming_topk import (
    HammingTopkConfig,
    code_signs,
    default_config,
    hamming_distance,
    hamming_distance_reference,
    hamming_distance_tensorcore,
    hamming_topk,
    hamming_topk_reference,
    hamming_topk_tensorcore,
)
from pallas_kernels.int8_matmul_mosaic import MosaicInt8Config


def np_distances(queries, codes):
    """int64 [Q, N] by counting set bits of the xor, byte by byte."""
    x = queries[:, None, :] ^ codes[None, :, :]
    return np.unpackbits(x.view(np.uint8), axis=-1).reshape(*x.shape[:2], -1).sum(-1)


def np_topk(queries, codes, k):
    """Ascending (distance, index): lexsort's last key is the primary one."""
    d = np_distances(queries, codes)
    idx = np.stack([np.lexsort((np.arange(len(codes)), row))[:k] for row in d])
    return np.take_along_axis(d, idx, axis=1), idx


def random_codes(rng, n, w, distinct=None):
    """uint32 [n, w]; with ``distinct``, only that many different codes (many exact ties)."""
    pool = rng.integers(0, 2**32, (distinct or n, w), dtype=np.uint32)
    return pool if distinct is None else pool[rng.integers(0, distinct, n)]


def assert_topk(d, i, want_d, want_i, n, cfg):
    """A top-k result equals the reference's; no padding sentinel or filler leaks out (every
    index is a real code)."""
    assert d.shape == i.shape == want_d.shape, cfg
    assert (np.asarray(i) >= 0).all() and (np.asarray(i) < n).all(), cfg
    np.testing.assert_array_equal(np.asarray(d), want_d, err_msg=f"{cfg=}")
    np.testing.assert_array_equal(np.asarray(i), want_i, err_msg=f"{cfg=}")


def codes_t(codes):
    """The word-major ("wn") shape of abstract codes."""
    return jax.ShapeDtypeStruct(codes.shape[::-1], codes.dtype)


def as_layout(codes, layout):
    return codes if layout == "nw" else np.ascontiguousarray(codes.T)


SMALL = HammingTopkConfig(block_q=16, block_n=32, num_splits=3, num_warps=4, num_stages=1)
# (Q, N, W, k, distinct codes or None)
TOPK_CASES = [
    (5, 300, 8, 10, 7),  # many ties, N not a multiple of block_n, Q ragged
    (17, 70, 1, 70, None),  # k = N, W = 1
    (33, 257, 2, 16, 3),  # k a power of two, three distinct codes
    (1, 100, 3, 1, None),  # Q = 1, k = 1
    (20, 150, 4, 37, 150),  # k > block_n (the running list is wider than a tile)
]


class HammingTests:
    interpret: bool
    configs = (SMALL, HammingTopkConfig(block_q=16, block_n=64, num_splits=1), None)

    @pytest.mark.parametrize("layout", ["nw", "wn"])
    @pytest.mark.parametrize("q,n,w", [(5, 300, 8), (33, 70, 1), (16, 64, 3)])
    def test_distance(self, q, n, w, layout):
        rng = np.random.default_rng([q, n, w])
        queries, codes = random_codes(rng, q, w), random_codes(rng, n, w)
        want = np_distances(queries, codes)
        got = hamming_distance(
            queries,
            as_layout(codes, layout),
            codes_layout=layout,
            config=SMALL,
            interpret=self.interpret,
        )
        assert got.shape == (q, n)
        np.testing.assert_array_equal(np.asarray(got), want)

    @pytest.mark.parametrize("layout", ["nw", "wn"])
    @pytest.mark.parametrize("q,n,w,k,distinct", TOPK_CASES)
    def test_topk_exact_with_ties(self, q, n, w, k, distinct, layout):
        rng = np.random.default_rng([q, n, w, k])
        queries, codes = random_codes(rng, q, w), random_codes(rng, n, w, distinct)
        want_d, want_i = np_topk(queries, codes, k)
        for cfg in self.configs:
            d, i = hamming_topk(
                queries,
                as_layout(codes, layout),
                k,
                codes_layout=layout,
                config=cfg,
                interpret=self.interpret,
            )
            assert_topk(d, i, want_d, want_i, n, cfg)

    def test_identical_codes_pick_lowest_indices(self):
        rng = np.random.default_rng(5)
        queries = random_codes(rng, 3, 2)
        codes = np.repeat(random_codes(rng, 1, 2), 200, axis=0)
        d, i = hamming_topk(queries, codes, 12, config=SMALL, interpret=self.interpret)
        np.testing.assert_array_equal(np.asarray(i), np.tile(np.arange(12), (3, 1)))
        np.testing.assert_array_equal(np.asarray(d), np_distances(queries, codes)[:, :12])

    def test_exact_match_found_first(self):
        rng = np.random.default_rng(9)
        codes = random_codes(rng, 500, 8)
        queries = codes[[417, 3, 250]]
        d, i = hamming_topk(queries, codes, 4, config=SMALL, interpret=self.interpret)
        np.testing.assert_array_equal(np.asarray(i)[:, 0], [417, 3, 250])
        np.testing.assert_array_equal(np.asarray(d)[:, 0], 0)


class TestHammingInterpret(HammingTests):
    interpret = True


@pytest.mark.gpu
class TestHammingGpu(HammingTests):
    interpret = False
    configs = HammingTests.configs + (
        HammingTopkConfig(block_q=32, block_n=256, num_splits=7, num_warps=8, num_stages=1),
    )

    def test_large_against_reference(self):
        rng = np.random.default_rng(1)
        queries, codes = random_codes(rng, 100, 8), random_codes(rng, 200_003, 8, 5000)
        for layout in ("nw", "wn"):
            want = hamming_topk_reference(queries, codes, 10)
            got = hamming_topk(queries, as_layout(codes, layout), 10, codes_layout=layout)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
            np.testing.assert_array_equal(
                np.asarray(
                    hamming_distance(queries, as_layout(codes, layout), codes_layout=layout)
                ),
                np.asarray(hamming_distance_reference(queries, codes)),
            )


class TestReferenceAndValidation:
    def test_references_match_numpy(self):
        rng = np.random.default_rng(2)
        queries, codes = random_codes(rng, 7, 3), random_codes(rng, 90, 3, 4)
        np.testing.assert_array_equal(
            np.asarray(hamming_distance_reference(queries, codes)), np_distances(queries, codes)
        )
        d, i = hamming_topk_reference(queries, codes, 20)
        want_d, want_i = np_topk(queries, codes, 20)
        np.testing.assert_array_equal(np.asarray(d), want_d)
        np.testing.assert_array_equal(np.asarray(i), want_i)

    def test_errors_name_the_argument(self):
        q, c = np.ones((2, 4), np.uint32), np.ones((10, 4), np.uint32)
        with pytest.raises(ValueError, match="queries.dtype"):
            hamming_topk(q.astype(np.int32), c, 3, interpret=True)
        with pytest.raises(ValueError, match="codes.dtype"):
            hamming_distance(q, c.astype(np.uint8), interpret=True)
        with pytest.raises(ValueError, match="words"):
            hamming_topk(q, np.ones((10, 3), np.uint32), 3, interpret=True)
        with pytest.raises(ValueError, match="k=11"):
            hamming_topk(q, c, 11, interpret=True)
        with pytest.raises(ValueError, match="k=0"):
            hamming_topk(q, c, 0, interpret=True)
        with pytest.raises(ValueError, match="codes_layout"):
            hamming_topk(q, c, 3, codes_layout="nk", interpret=True)
        with pytest.raises(ValueError, match="block_n"):
            hamming_topk(q, c, 3, config=HammingTopkConfig(block_n=48), interpret=True)
        with pytest.raises(ValueError, match="k=2.5"):
            hamming_topk(q, c, 2.5, interpret=True)

    def test_numpy_int_k_and_no_queries(self):
        rng = np.random.default_rng(3)
        q, c = random_codes(rng, 3, 4), random_codes(rng, 40, 4)
        d, i = hamming_topk(q, c, np.int64(5), interpret=True)
        want_d, want_i = np_topk(q, c, 5)
        np.testing.assert_array_equal(np.asarray(d), want_d)
        np.testing.assert_array_equal(np.asarray(i), want_i)
        # No queries (or no codes for the matrix): empty results, not a 0-sized grid's error.
        d, i = hamming_topk(q[:0], c, 3, interpret=True)
        assert d.shape == i.shape == (0, 3) and d.dtype == i.dtype == jnp.int32
        assert hamming_distance(q[:0], c, interpret=True).shape == (0, 40)
        assert hamming_distance(q, c[:0], interpret=True).shape == (3, 0)

    @pytest.mark.parametrize("w", [8, 3])
    def test_kernels_lower_for_cuda(self, w):
        """Pallas-Triton lowers in Python, so what it cannot lower (a slice of a loaded block,
        a dot's dtypes) fails here on CPU, not in a GPU session."""
        queries = jax.ShapeDtypeStruct((512, w), jnp.uint32)
        codes = jax.ShapeDtypeStruct((1 << 20, w), jnp.uint32)
        signs = jax.ShapeDtypeStruct((1 << 20, 32 * w), jnp.int8)
        programs = [
            (functools.partial(hamming_topk, k=10), codes),
            (functools.partial(hamming_topk, k=10, codes_layout="wn"), codes_t(codes)),
            (hamming_distance, codes),
            (functools.partial(hamming_topk_tensorcore, k=10), signs),
        ]
        for fn, operand in programs:
            text = jax.jit(fn).trace(queries, operand).lower(lowering_platforms=("cuda",))
            assert "triton" in text.as_text()

    @pytest.mark.parametrize("q,n", [(1, 1 << 20), (64, 1 << 20), (512, 10_000_000), (3, 5)])
    def test_default_config_is_valid(self, q, n):
        default_config(q, n, 8).validate()


# The tensor-core formulation: d = (bits - q . c) / 2 over +-1 signs, an int8 GEMM (Mosaic GPU).
TC_SMALL = MosaicInt8Config(tile_m=64, tile_n=64, tile_k=128, stages=2, wg_dim="m")
# The fused tensor-core top-k: Pallas-Triton, int8 dot tiles of >= 16 x 16.
TC_TOPK_SMALL = HammingTopkConfig(block_q=16, block_n=32, num_splits=3, num_warps=4)


class TensorcoreTests:
    interpret: bool
    cases = [(37, 150, 8, TC_SMALL)]  # (Q, N, W, config): ragged Q and N, 256-bit codes
    topk_configs = (TC_TOPK_SMALL,)

    def test_signs_unpack_the_bits(self):
        rng = np.random.default_rng(1)
        codes = random_codes(rng, 9, 2)
        signs = np.asarray(code_signs(codes))
        bits = np.unpackbits(codes.view(np.uint8), axis=-1, bitorder="little")
        np.testing.assert_array_equal(signs, 1 - 2 * bits.astype(np.int8))
        np.testing.assert_array_equal(
            np.asarray(code_signs(as_layout(codes, "wn"), codes_layout="wn")), signs
        )

    def test_distances_exact(self):
        for q, n, w, cfg in self.cases:
            rng = np.random.default_rng([q, n, w])
            queries, codes = random_codes(rng, q, w), random_codes(rng, n, w, distinct=n // 3)
            got = hamming_distance_tensorcore(
                queries, code_signs(codes), config=cfg, interpret=self.interpret
            )
            np.testing.assert_array_equal(np.asarray(got), np_distances(queries, codes))

    @pytest.mark.parametrize("q,n,w,k,distinct", TOPK_CASES)
    def test_fused_topk_exact_with_ties(self, q, n, w, k, distinct):
        """The fused tensor-core top-k returns hamming_topk's result: same distances, same
        tie order (the lower index first), for ragged Q and N, k = N, k > block_n, W = 1 and
        W = 3 (three K steps of 32)."""
        rng = np.random.default_rng([q, n, w, k, 1])
        queries, codes = random_codes(rng, q, w), random_codes(rng, n, w, distinct)
        want_d, want_i = np_topk(queries, codes, k)
        signs = code_signs(codes)
        for cfg in self.topk_configs:
            d, i = hamming_topk_tensorcore(queries, signs, k, config=cfg, interpret=self.interpret)
            assert_topk(d, i, want_d, want_i, n, cfg)

    def test_fused_topk_identical_codes_pick_lowest_indices(self):
        rng = np.random.default_rng(6)
        queries = random_codes(rng, 3, 8)
        codes = np.repeat(random_codes(rng, 1, 8), 100, axis=0)
        d, i = hamming_topk_tensorcore(
            queries, code_signs(codes), 12, config=TC_TOPK_SMALL, interpret=self.interpret
        )
        np.testing.assert_array_equal(np.asarray(i), np.tile(np.arange(12), (3, 1)))
        np.testing.assert_array_equal(np.asarray(d), np_distances(queries, codes)[:, :12])

    def test_bad_signs(self):
        queries = np.zeros((2, 8), np.uint32)
        with pytest.raises(ValueError, match="signs"):
            hamming_distance_tensorcore(queries, np.zeros((5, 128), np.int8))
        with pytest.raises(ValueError, match="signs"):
            hamming_topk_tensorcore(queries, np.zeros((5, 256), np.uint8), 3)
        with pytest.raises(ValueError, match="queries"):
            hamming_topk_tensorcore(queries.astype(np.int32), np.zeros((5, 256), np.int8), 3)
        with pytest.raises(ValueError, match="k=6"):
            hamming_topk_tensorcore(queries, np.zeros((5, 256), np.int8), 6)
        with pytest.raises(ValueError, match="block_q=8"):
            hamming_topk_tensorcore(
                queries, np.zeros((5, 256), np.int8), 3, config=HammingTopkConfig(block_q=8)
            )
        with pytest.raises(ValueError, match="config"):
            hamming_topk_tensorcore(queries, np.zeros((5, 256), np.int8), 3, config=TC_SMALL)
        with pytest.raises(ValueError, match="config"):
            hamming_distance_tensorcore(
                queries, np.zeros((5, 256), np.int8), config=HammingTopkConfig()
            )


class TestTensorcoreInterpret(TensorcoreTests):
    interpret = True


@pytest.mark.gpu
class TestTensorcoreGpu(TensorcoreTests):
    interpret = False
    cases = TensorcoreTests.cases + [(512, 100_000, 8, None), (64, 4099, 16, None)]
    topk_configs = (
        TC_TOPK_SMALL,
        None,
        HammingTopkConfig(block_q=64, block_n=64, num_splits=1, num_warps=4),
        HammingTopkConfig(block_q=128, block_n=128, num_splits=5, num_warps=8),
    )

    def test_fused_topk_large_against_reference(self):
        rng = np.random.default_rng(3)
        for q, n, w in [(512, 200_003, 8), (7, 50_000, 32)]:
            queries, codes = random_codes(rng, q, w), random_codes(rng, n, w, n // 40)
            want = hamming_topk_reference(queries, codes, 10)
            got = hamming_topk_tensorcore(queries, code_signs(codes), 10)
            for g, x in zip(got, want):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(x))
