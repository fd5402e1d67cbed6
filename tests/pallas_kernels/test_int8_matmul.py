"""int8_matmul against exact int64 numpy / float64 references, in every layout and ragged shape.

Each test class runs twice: interpret=True on CPU, and compiled (interpret=False) on a GPU.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.int8_matmul import (
    Int8MatmulConfig,
    default_config,
    int8_matmul,
    int8_matmul_reference,
)
from pallas_kernels.int8_matmul_mosaic import MosaicInt8Config, default_mosaic_config

# Small tiles in interpret mode: more blocks (ragged edges, the grouped launch order) per shape.
SMALL = Int8MatmulConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2, group_m=3)
SPLIT = Int8MatmulConfig(block_m=16, block_n=32, block_k=32, num_stages=2, group_m=2, split_k=3)
SHAPES = [(37, 70, 45), (16, 16, 16), (100, 48, 130), (64, 96, 32)]
LAYOUTS = [(False, False), (True, False), (False, True), (True, True)]


def _operands(rng, m, n, k, transpose_a, transpose_b):
    a = rng.integers(-128, 128, (k, m) if transpose_a else (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (n, k) if transpose_b else (k, n), dtype=np.int8)
    return a, b


def _exact(a, b, transpose_a, transpose_b):
    a64 = (a.T if transpose_a else a).astype(np.int64)
    b64 = (b.T if transpose_b else b).astype(np.int64)
    return a64 @ b64


class Int8MatmulTests:
    interpret: bool
    configs = (SMALL, None)
    extra_shapes: tuple = ()

    @pytest.mark.parametrize("transpose_a,transpose_b", LAYOUTS)
    @pytest.mark.parametrize("m,n,k", SHAPES)
    def test_int32_exact(self, m, n, k, transpose_a, transpose_b):
        rng = np.random.default_rng([m, n, k, transpose_a, transpose_b])
        a, b = _operands(rng, m, n, k, transpose_a, transpose_b)
        want = _exact(a, b, transpose_a, transpose_b)
        for cfg in self.configs:
            got = int8_matmul(
                a,
                b,
                transpose_a=transpose_a,
                transpose_b=transpose_b,
                out_dtype=jnp.int32,
                config=cfg,
                interpret=self.interpret,
            )
            assert got.shape == (m, n) and got.dtype == jnp.int32
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{cfg=}")

    @pytest.mark.parametrize("transpose_a,transpose_b", LAYOUTS)
    def test_scaled_float32(self, transpose_a, transpose_b):
        m, n, k = 37, 70, 45
        rng = np.random.default_rng(7)
        a, b = _operands(rng, m, n, k, transpose_a, transpose_b)
        sa = rng.uniform(0.01, 2.0, m).astype(np.float32)
        sb = rng.uniform(0.01, 2.0, n).astype(np.float32)
        want = _exact(a, b, transpose_a, transpose_b) * sa[:, None].astype(np.float64) * sb[None, :]
        got = np.asarray(
            int8_matmul(
                a,
                b,
                sa,
                sb,
                transpose_a=transpose_a,
                transpose_b=transpose_b,
                config=SMALL,
                interpret=self.interpret,
            )
        )
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())

    @pytest.mark.parametrize("transpose_a,transpose_b", LAYOUTS)
    def test_reference_matches_float64(self, transpose_a, transpose_b):
        # The jnp reference runs through XLA on the test's device. On an H200 (jax 0.11.2) XLA's
        # int8 dot returned exactly 2x this answer for K = 45 (benchmarks/probe_int8_reference.py);
        # the reference pads K to a multiple of 4 to stay off that path.
        m, n, k = 37, 70, 45
        rng = np.random.default_rng(7)
        a, b = _operands(rng, m, n, k, transpose_a, transpose_b)
        sa = rng.uniform(0.01, 2.0, m).astype(np.float32)
        sb = rng.uniform(0.01, 2.0, n).astype(np.float32)
        want = _exact(a, b, transpose_a, transpose_b) * sa[:, None].astype(np.float64) * sb[None, :]
        ref = int8_matmul_reference(a, b, sa, sb, transpose_a=transpose_a, transpose_b=transpose_b)
        np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())

    @pytest.mark.parametrize("which", ["a", "b"])
    def test_one_scale(self, which):
        m, n, k = 50, 33, 64
        rng = np.random.default_rng(3)
        a, b = _operands(rng, m, n, k, False, False)
        sa = rng.uniform(0.5, 1.5, m).astype(np.float32) if which == "a" else None
        sb = rng.uniform(0.5, 1.5, n).astype(np.float32) if which == "b" else None
        want = _exact(a, b, False, False).astype(np.float64)
        want = (
            want
            * (sa[:, None] if sa is not None else 1.0)
            * (sb[None, :] if sb is not None else 1.0)
        )
        got = np.asarray(int8_matmul(a, b, sa, sb, config=SMALL, interpret=self.interpret))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())

    @pytest.mark.parametrize("transpose_a,transpose_b", LAYOUTS)
    @pytest.mark.parametrize("with_scales", [False, True])
    def test_split_k(self, transpose_a, transpose_b, with_scales):
        # K = 200 is ragged for block_k * split_k = 96: the padded tail must add nothing.
        m, n, k = 40, 50, 200
        rng = np.random.default_rng([m, n, k, transpose_a, transpose_b, with_scales])
        a, b = _operands(rng, m, n, k, transpose_a, transpose_b)
        sa = rng.uniform(0.5, 1.5, m).astype(np.float32) if with_scales else None
        sb = rng.uniform(0.5, 1.5, n).astype(np.float32) if with_scales else None
        want = _exact(a, b, transpose_a, transpose_b).astype(np.float64)
        if with_scales:
            want = want * sa[:, None] * sb[None, :]
        got = int8_matmul(
            a,
            b,
            sa,
            sb,
            transpose_a=transpose_a,
            transpose_b=transpose_b,
            out_dtype=jnp.float32 if with_scales else jnp.int32,
            config=SPLIT,
            interpret=self.interpret,
        )
        assert got.shape == (m, n)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=0)

    def test_bfloat16_out_without_scales(self):
        rng = np.random.default_rng(11)
        a, b = _operands(rng, 40, 24, 20, False, True)
        got = int8_matmul(
            a, b, transpose_b=True, out_dtype=jnp.bfloat16, config=SMALL, interpret=self.interpret
        )
        assert got.dtype == jnp.bfloat16
        want = _exact(a, b, False, True).astype(jnp.bfloat16)
        np.testing.assert_array_equal(
            np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(np.float32))
        )

    def test_extra_shapes_default_config(self):
        for m, n, k in self.extra_shapes:
            rng = np.random.default_rng([m, n, k])
            for ta, tb in LAYOUTS:
                a, b = _operands(rng, m, n, k, ta, tb)
                got = int8_matmul(
                    a,
                    b,
                    transpose_a=ta,
                    transpose_b=tb,
                    out_dtype=jnp.int32,
                    interpret=self.interpret,
                )
                np.testing.assert_array_equal(
                    np.asarray(got), _exact(a, b, ta, tb), err_msg=f"{(m, n, k, ta, tb)=}"
                )


class TestInt8MatmulInterpret(Int8MatmulTests):
    interpret = True


@pytest.mark.gpu
class TestInt8MatmulGpu(Int8MatmulTests):
    interpret = False
    configs = (
        SMALL,
        None,
        Int8MatmulConfig(block_m=128, block_n=256, block_k=128, num_warps=8, num_stages=3),
    )
    extra_shapes = ((1000, 1500, 700), (2048, 512, 576), (777, 64, 147))


# The Mosaic GPU (wgmma) kernel. Its interpreter simulates every warpgroup, ~10 s a call: one
# small config, ragged shapes (padding), both warpgroup splits, every layout, scales or not.
MOSAIC_SMALL_N = MosaicInt8Config(
    tile_m=64, tile_n=64, tile_k=64, stages=2, wg_dim="n", grid_width=2
)
MOSAIC_SMALL_M = MosaicInt8Config(
    tile_m=64, tile_n=32, tile_k=64, stages=3, wg_dim="m", grid_minor="m"
)
MOSAIC_SLOTS = MosaicInt8Config(tile_m=64, tile_n=64, tile_k=64, stages=2, epi_n=16, epi_slots=3)
MOSAIC_SPLIT = MosaicInt8Config(tile_m=64, tile_n=64, tile_k=64, stages=2, wg_dim="m", split_k=3)
MOSAIC_CASES = [  # (m, n, k, transpose_a, transpose_b, with_scales, config)
    (200, 72, 100, False, True, True, MOSAIC_SMALL_N),
    (128, 128, 192, False, False, False, MOSAIC_SLOTS),  # 3 store slots over 8 pieces
    (130, 64, 64, True, False, True, MOSAIC_SMALL_M),
    (64, 40, 70, True, True, False, MOSAIC_SMALL_M),
    # split K: 3 slices of 2 steps; K = 300 pads to 384, the padded tail must add nothing
    (100, 64, 300, True, False, True, MOSAIC_SPLIT),
]


class MosaicTests:
    interpret: bool
    cases = MOSAIC_CASES

    @pytest.mark.parametrize("case", range(len(MOSAIC_CASES)))
    def test_mosaic_exact(self, case):
        if case >= len(self.cases):
            pytest.skip("no such case here")
        m, n, k, transpose_a, transpose_b, with_scales, cfg = self.cases[case]
        rng = np.random.default_rng([m, n, k, case])
        a, b = _operands(rng, m, n, k, transpose_a, transpose_b)
        sa = rng.uniform(0.5, 1.5, m).astype(np.float32) if with_scales else None
        sb = rng.uniform(0.5, 1.5, n).astype(np.float32) if with_scales else None
        want = _exact(a, b, transpose_a, transpose_b)
        got = int8_matmul(
            a,
            b,
            sa,
            sb,
            transpose_a=transpose_a,
            transpose_b=transpose_b,
            out_dtype=jnp.float32 if with_scales else jnp.int32,
            config=cfg,
            interpret=self.interpret,
        )
        assert got.shape == (m, n)
        if with_scales:
            want = want * sa[:, None].astype(np.float64) * sb[None, :]
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=0, err_msg=f"{cfg}")
        else:
            assert got.dtype == jnp.int32
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{cfg}")


class TestMosaicInterpret(MosaicTests):
    interpret = True


@pytest.mark.gpu
class TestMosaicGpu(MosaicTests):
    # On the chip: the default tiles and the benchmark's candidates on larger, ragged shapes.
    interpret = False
    cases = MOSAIC_CASES + [
        (1000, 1500, 700, False, True, True, default_mosaic_config(1000, 1500, 700)),
        (2048, 512, 576, False, False, False, default_mosaic_config(2048, 512, 576)),
        (777, 64, 147, False, True, True, default_mosaic_config(777, 64, 147)),
        (1024, 1024, 2048, False, True, False, MosaicInt8Config(wg_dim="m", stages=4)),
        (
            1024,
            1024,
            2048,
            False,
            True,
            True,
            MosaicInt8Config(tile_m=64, tile_n=256, wg_dim="m", stages=3),
        ),
        (512, 768, 1024, True, False, True, MosaicInt8Config(tile_k=64, stages=6)),
        # the weight-gradient shape class: few output tiles, K split (default config)
        (576, 64, 100000, True, False, True, default_mosaic_config(576, 64, 100000)),
        (1152, 576, 8192, True, False, False, default_mosaic_config(1152, 576, 8192)),
    ]

    @pytest.mark.parametrize("case", range(len(MOSAIC_CASES), len(MOSAIC_CASES) + 8))
    def test_mosaic_exact_large(self, case):
        self.test_mosaic_exact(case)


class TestMosaicConfig:
    @pytest.mark.parametrize(
        "field,value",
        [("tile_m", 96), ("tile_n", 260), ("tile_k", 256), ("wg_dim", "k"), ("stages", 1)],
    )
    def test_bad_config(self, field, value):
        with pytest.raises(ValueError, match=field):
            MosaicInt8Config(**{field: value}).validate()

    def test_shared_memory_limit(self):
        with pytest.raises(ValueError, match="shared memory"):
            MosaicInt8Config(stages=8).validate()

    @pytest.mark.parametrize(
        "m,n,k",
        [(8192, 8192, 8192), (802816, 64, 576), (802816, 576, 64), (50176, 2304, 256), (5, 7, 3)],
    )
    def test_default_is_valid(self, m, n, k):
        cfg = default_mosaic_config(m, n, k)
        cfg.validate()
        if n % 64 == 0:
            assert n % cfg.cta_tile()[1] == 0  # no padded output columns
        if k % 64 == 0:
            assert k % cfg.tile_k == 0

    def test_pick_config_follows_the_measured_classes(self, monkeypatch):
        from pallas_kernels import int8_matmul as im

        assert isinstance(im.pick_config(8192, 8192, 8192), Int8MatmulConfig)  # no Hopper here
        monkeypatch.setattr(im, "on_hopper", lambda: True)
        assert isinstance(im.pick_config(8192, 8192, 8192), MosaicInt8Config)
        assert isinstance(im.pick_config(8192, 8192, 8192, interpret=True), Int8MatmulConfig)
        assert isinstance(im.pick_config(802816, 576, 64), Int8MatmulConfig)  # K < 256
        assert isinstance(im.pick_config(576, 64, 802816, transpose_a=True), Int8MatmulConfig)
        assert isinstance(im.pick_config(2304, 256, 50176, transpose_a=True), MosaicInt8Config)

    def test_default_splits_k_only_for_few_output_tiles(self):
        assert default_mosaic_config(8192, 8192, 8192).split_k == 1
        assert default_mosaic_config(802816, 64, 576).split_k == 1
        big = default_mosaic_config(576, 64, 802816)  # ResNet-50 conv1-stage G_W: 3 tiles
        assert big.split_k >= 32 and (802816 // big.tile_k) % big.split_k == 0


class TestValidation:
    def test_dtype(self):
        a = np.zeros((4, 4), np.int16)
        with pytest.raises(ValueError, match="a.dtype"):
            int8_matmul(a, np.ones((4, 4), np.int8), interpret=True)
        with pytest.raises(ValueError, match="b.dtype"):
            int8_matmul(np.ones((4, 4), np.int8), np.ones((4, 4), np.float32), interpret=True)

    def test_mismatched_k(self):
        with pytest.raises(ValueError, match="contraction"):
            int8_matmul(np.ones((4, 5), np.int8), np.ones((6, 4), np.int8), interpret=True)
        with pytest.raises(ValueError, match="transpose_b=True"):
            int8_matmul(
                np.ones((4, 5), np.int8), np.ones((6, 4), np.int8), transpose_b=True, interpret=True
            )

    def test_scale_shapes(self):
        a, b = np.ones((4, 5), np.int8), np.ones((5, 6), np.int8)
        with pytest.raises(ValueError, match="a_scale"):
            int8_matmul(a, b, np.ones(5, np.float32), interpret=True)
        with pytest.raises(ValueError, match="b_scale"):
            int8_matmul(a, b, None, np.ones((1, 6), np.float32), interpret=True)

    def test_int32_out_with_scales(self):
        a, b = np.ones((4, 5), np.int8), np.ones((5, 6), np.int8)
        with pytest.raises(ValueError, match="out_dtype"):
            int8_matmul(a, b, np.ones(4, np.float32), out_dtype=jnp.int32, interpret=True)

    @pytest.mark.parametrize("dtype", [np.complex64, np.bool_, np.int32])
    def test_scale_dtypes(self, dtype):
        # (A complex scale lost its imaginary part; bool and int scales went through.)
        a, b = np.ones((2, 5), np.int8), np.ones((5, 3), np.int8)
        with pytest.raises(ValueError, match="a_scale.dtype=.* must be a real float"):
            int8_matmul(a, b, np.ones(2, dtype), interpret=True)
        with pytest.raises(ValueError, match="b_scale.dtype=.* must be a real float"):
            int8_matmul_reference(a, b, None, np.ones(3, dtype))

    def test_out_dtypes(self):
        a, b = np.ones((2, 5), np.int8), np.ones((5, 3), np.int8)
        # (float64 failed inside the kernel's store: "Invalid dtype for swap".)
        with pytest.raises(ValueError, match="out_dtype=float64 must be one of"):
            int8_matmul(a, b, out_dtype=np.float64, interpret=True)
        for dtype in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32):
            out = int8_matmul(a, b, out_dtype=dtype, interpret=True)
            assert out.dtype == dtype and np.all(np.asarray(out, np.float32) == 5)

    @pytest.mark.parametrize("m, n, k", [(7, 5, 0), (0, 5, 3), (7, 0, 3), (0, 0, 0)])
    def test_empty_operands(self, m, n, k):
        # Any M, N, K, 0 included: K = 0 gives zero sums (the Pallas grid had a 0-wide block).
        a, b = np.ones((m, k), np.int8), np.ones((k, n), np.int8)
        scales = np.full(m, 2.0, np.float32), np.full(n, 3.0, np.float32)
        for transpose_a in (False, True):
            out = int8_matmul(
                a.T if transpose_a else a, b, *scales, transpose_a=transpose_a, interpret=True
            )
            assert out.shape == (m, n) and out.dtype == jnp.float32
            np.testing.assert_array_equal(out, np.zeros((m, n)))

    @pytest.mark.parametrize(
        "field,value",
        [
            ("block_m", 24),
            ("block_n", 8),
            ("block_k", 0),
            ("num_warps", 3),
            ("group_m", 0),
            ("split_k", 0),
        ],
    )
    def test_bad_config(self, field, value):
        cfg = Int8MatmulConfig(**{field: value})
        with pytest.raises(ValueError, match=field):
            int8_matmul(
                np.ones((4, 5), np.int8), np.ones((5, 6), np.int8), config=cfg, interpret=True
            )

    @pytest.mark.parametrize(
        "m,n,k",
        [(4096, 4096, 4096), (802816, 64, 576), (12544, 2048, 512), (147, 64, 3211264), (5, 7, 3)],
    )
    def test_default_config_is_valid(self, m, n, k):
        cfg = default_config(m, n, k)
        cfg.validate()
        if m % 128 == 0:
            assert m % cfg.block_m == 0  # no padding of a large aligned dim
        if k % 64 == 0:
            assert k % cfg.block_k == 0
            assert (k // cfg.block_k) % cfg.split_k == 0  # split-K never pads K either

    def test_default_splits_k_only_for_few_output_tiles(self):
        assert default_config(8192, 8192, 8192).split_k == 1
        assert default_config(802816, 64, 576).split_k == 1
        assert default_config(576, 64, 802816).split_k > 8  # ResNet-50 conv1-stage G_W
