"""INT8 x INT8 -> INT32 matmul with a fused per-row / per-column scale epilogue (Pallas, Triton).

The op behind INT8 training (alijax.quant): forward Y = X W, and the two backward GEMMs
G_X = G_Y W^T (``transpose_b=True``) and G_W = X^T G_Y (``transpose_a=True``). A transposed
operand is read transposed by block indexing of its ref (the kernel loads a [block_k, block_m]
tile of the stored [K, M] array and hands ``dot`` the transpose), so no transposed copy is made.

Ragged M, N, K are zero-padded in the wrapper up to the block sizes (a copy, only when a dim is
not a multiple of its block; ``default_config`` picks blocks that divide the dims when it can).
Zero rows/columns add nothing to the int32 accumulator and padded outputs are sliced away, so
the result is exact for any shape.

Public API:
  int8_matmul(a, b, a_scale=None, b_scale=None, *, transpose_a, transpose_b, out_dtype,
              config, interpret) -> [M, N]
  int8_matmul_reference(...)  same signature minus config/interpret, plain jnp
  Int8MatmulConfig, default_config(m, n, k)   Triton tiles
  MosaicInt8Config (int8_matmul_mosaic.py)     a config of this type runs the Mosaic GPU
                                               (wgmma) kernel instead
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._shared import (
    TritonCompilerParams,
    caller_independent_locations,
    is_pow2,
    pad_to,
    scale_accumulator,
    triton_dot,
)
from pallas_kernels.int8_matmul_mosaic import (
    MosaicInt8Config,
    default_mosaic_config,
    int8_matmul_nt,
)


@dataclasses.dataclass(frozen=True)
class Int8MatmulConfig:
    """Tile configuration. Block sizes are powers of two >= 16 (Triton tensor shapes are
    powers of two; int8 MMA needs >= 16 along each dim). ``group_m`` rows of output blocks
    are visited together so their A panels stay in L2 (the usual grouped launch order)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    split_k: int = 1  # programs that share one output tile, each summing a slice of K

    def validate(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not (is_pow2(v) and v >= 16):
                raise ValueError(f"config.{name}={v} must be a power of two >= 16")
        if not is_pow2(self.num_warps):
            raise ValueError(f"config.num_warps={self.num_warps} must be a power of two")
        if self.num_stages < 1:
            raise ValueError(f"config.num_stages={self.num_stages} must be >= 1")
        if self.group_m < 1:
            raise ValueError(f"config.group_m={self.group_m} must be >= 1")
        if self.split_k < 1:
            raise ValueError(f"config.split_k={self.split_k} must be >= 1")


def _pick_block(dim: int, choices: tuple[int, ...]) -> int:
    """Largest choice dividing ``dim``; else the smallest choice >= dim; else the largest."""
    for c in choices:
        if dim % c == 0:
            return c
    fitting = [c for c in choices if c >= dim]
    return min(fitting) if fitting else choices[0]


def default_config(m: int, n: int, k: int) -> Int8MatmulConfig:
    """A per-shape default from the H200 sweep of 2026-11-26 (benchmarks/RESULTS.md): tall,
    narrow tiles won clearly at 4096^3 and 8192^3 (256x64x128 with 4 warps: 421 and 458 TOPS;
    128x128: ~180; 128x256 with 8 warps: ~100), so block_m is taken as large and block_n as
    narrow as the shape allows; block_k divides K when it can, and K is split when the output
    has too few tiles to fill the GPU."""
    block_m = _pick_block(m, (256, 128, 64, 32, 16))
    block_n = _pick_block(n, (64, 128, 32, 16))
    block_k = _pick_block(k, (128, 64, 32))
    return Int8MatmulConfig(
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        num_warps=4,
        num_stages=3,
        group_m=8,
        split_k=default_split_k(m, n, k, block_m, block_n, block_k),
    )


# Programs to aim for: two waves of an H100/H200's 132 multiprocessors.
_TARGET_PROGRAMS = 2 * 132


def default_split_k(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int) -> int:
    """Splits K when the output has too few tiles to fill the GPU, choosing a divisor of the
    number of K blocks (so no operand is padded) and keeping >= 4 K blocks per split."""
    tiles = pl.cdiv(m, block_m) * pl.cdiv(n, block_n)
    k_blocks = pl.cdiv(k, block_k)
    if tiles >= _TARGET_PROGRAMS // 2 or k_blocks < 8:
        return 1
    want = min(pl.cdiv(_TARGET_PROGRAMS, tiles), k_blocks // 4)
    return max(d for d in range(1, want + 1) if k_blocks % d == 0)


def _check_inputs(a, b, a_scale, b_scale, transpose_a, transpose_b, out_dtype):
    """Validates dtypes/shapes and returns (m, n, k)."""
    for name, x in (("a", a), ("b", b)):
        if x.dtype != jnp.int8:
            raise ValueError(f"{name}.dtype={x.dtype} must be int8")
        if x.ndim != 2:
            raise ValueError(f"{name}.shape={x.shape} must be 2-D")
    m, ka = (a.shape[1], a.shape[0]) if transpose_a else a.shape
    n, kb = (b.shape[0], b.shape[1]) if transpose_b else (b.shape[1], b.shape[0])
    if ka != kb:
        raise ValueError(
            f"contraction dims differ: a gives K={ka}, b gives K={kb} "
            f"({a.shape=}, {b.shape=}, {transpose_a=}, {transpose_b=})"
        )
    for name, scale, size, dim in (("a_scale", a_scale, m, "M"), ("b_scale", b_scale, n, "N")):
        if scale is None:
            continue
        if tuple(scale.shape) != (size,):
            raise ValueError(f"{name}.shape={tuple(scale.shape)} must be ({dim},)=({size},)")
        if not jnp.issubdtype(scale.dtype, jnp.floating):  # (a complex one lost its imaginary part)
            raise ValueError(f"{name}.dtype={scale.dtype} must be a real float dtype")
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype={out_dtype} must be one of {', '.join(map(str, OUT_DTYPES))}")
    if (a_scale is not None or b_scale is not None) and out_dtype == jnp.int32:
        raise ValueError(f"out_dtype={out_dtype} must be floating when a scale is given")
    return m, n, ka


# What the kernels' epilogues store (float64 is not among them: the scales apply in float32).
OUT_DTYPES = tuple(map(jnp.dtype, (jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32)))


def int8_matmul_reference(
    a, b, a_scale=None, b_scale=None, *, transpose_a=False, transpose_b=False, out_dtype=jnp.float32
):
    """Plain-jnp reference. a: [M, K] (or [K, M] if transpose_a), b: [K, N] (or [N, K] if
    transpose_b), a_scale: [M], b_scale: [N] -> [M, N] out_dtype."""
    _check_inputs(a, b, a_scale, b_scale, transpose_a, transpose_b, out_dtype)
    a_k, b_k = (0 if transpose_a else 1), (1 if transpose_b else 0)
    # XLA:GPU returned exactly 2x the int8 x int8 -> int32 product when K % 4 != 0 (H200, jax
    # 0.11.2, 2026-11-26; K = 48 was right: benchmarks/probe_int8_reference.py). Zero-padding K
    # to a multiple of 4 leaves the product unchanged and keeps the reference off that path.
    pad_k = (-a.shape[a_k]) % 4
    if pad_k:
        a = jnp.pad(a, [(0, pad_k) if axis == a_k else (0, 0) for axis in range(2)])
        b = jnp.pad(b, [(0, pad_k) if axis == b_k else (0, 0) for axis in range(2)])
    acc = lax.dot_general(a, b, (((a_k,), (b_k,)), ((), ())), preferred_element_type=jnp.int32)
    return scale_accumulator(acc, a_scale, b_scale, out_dtype)


def on_hopper() -> bool:
    """True when the default device is a Hopper GPU (compute capability 9.x), where int8 wgmma
    exists and the Mosaic GPU kernel runs."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith(
        "9"
    )


def pick_config(m: int, n: int, k: int, transpose_a: bool = False, interpret: bool = False):
    """The config int8_matmul uses when given none, by the H200 sweep of 2026-11-26
    (benchmarks/RESULTS.md): the Mosaic GPU kernel on Hopper (8192^3: 1450 TOPS against 458 for
    Pallas-Triton; ResNet-50 forward GEMMs 1.2-2.5x Triton), except where Triton measured faster:
    K < 256, whose output-bound GEMMs (G_X of the first two stages) Mosaic's epilogue runs at a
    third of Triton's rate, and transposed-A GEMMs of fewer than 16 output tiles (G_W of the
    first two stages), where Mosaic also pays for copying both operands K-major. Triton
    everywhere else (not Hopper) and in interpret mode."""
    if interpret or not on_hopper():
        return default_config(m, n, k)
    mosaic = default_mosaic_config(m, n, k)
    cta_m, cta_n = mosaic.cta_tile()
    few_tiles = pl.cdiv(m, cta_m) * pl.cdiv(n, cta_n) < 16
    if k < 256 or (transpose_a and few_tiles):
        return default_config(m, n, k)
    return mosaic


def _block_ids(pid, num_m, num_n, group_m):
    """Grouped launch order: consecutive programs walk down ``group_m`` rows of output blocks
    before moving right, so the B panel and group_m A panels are reused from L2."""
    # lax's truncating div / rem, exact here (all non-negative): Python's // and % on a traced
    # int are floor division, whose sign fix-ups cost a compare and select per op.
    group_size = np.int32(group_m * num_n)
    group = lax.div(pid, group_size)
    first_m = group * np.int32(group_m)
    rows_in_group = lax.min(np.int32(num_m) - first_m, np.int32(group_m))
    in_group = lax.rem(pid, group_size)
    return first_m + lax.rem(in_group, rows_in_group), lax.div(in_group, rows_in_group)


def int8_matmul_kernel(
    a_ref,
    b_ref,
    *rest,
    block_k,
    num_k,
    transpose_a,
    transpose_b,
    has_a_scale,
    has_b_scale,
    out_dtype,
):
    """One [block_m, block_n] output tile: loop over K in block_k steps, int32 accumulate,
    then the scale epilogue. a_ref is [block_m, K] ([K, block_m] if transpose_a); b_ref is
    [K, block_n] ([block_n, K] if transpose_b)."""
    rest = list(rest)
    sa_ref = rest.pop(0) if has_a_scale else None
    sb_ref = rest.pop(0) if has_b_scale else None
    (o_ref,) = rest
    block_m, block_n = o_ref.shape

    def body(kk, acc):
        ks = pl.ds(pl.multiple_of(kk * block_k, block_k), block_k)
        a = a_ref[ks, :] if transpose_a else a_ref[:, ks]
        b = b_ref[:, ks] if transpose_b else b_ref[ks, :]
        return acc + triton_dot(a, b, trans_a=transpose_a, trans_b=transpose_b)

    acc = lax.fori_loop(0, num_k, body, jnp.zeros((block_m, block_n), jnp.int32))
    if sa_ref is None and sb_ref is None:
        o_ref[...] = acc.astype(out_dtype)
        return
    y = acc.astype(jnp.float32)
    if sa_ref is not None:
        y = y * sa_ref[...].astype(jnp.float32)[:, None]
    if sb_ref is not None:
        y = y * sb_ref[...].astype(jnp.float32)[None, :]
    o_ref[...] = y.astype(out_dtype)


def _split_operands(a, b, transpose_a, transpose_b, bm, bn, bk, split_k):
    """Zero-pads a and b so M, N divide their blocks and K divides block_k * split_k."""
    kmul = bk * split_k
    a = pad_to(a, (kmul, bm) if transpose_a else (bm, kmul))
    b = pad_to(b, (bn, kmul) if transpose_b else (kmul, bn))
    return a, b


@functools.partial(
    jax.jit, static_argnames=("transpose_a", "transpose_b", "out_dtype", "config", "interpret")
)
def int8_matmul(
    a,
    b,
    a_scale=None,
    b_scale=None,
    *,
    transpose_a=False,
    transpose_b=False,
    out_dtype=jnp.float32,
    config=None,
    interpret=False,
):
    """INT8 GEMM with int32 accumulation and an optional fused dequantisation epilogue.

    Args:
      a: int8 [M, K], or [K, M] with transpose_a (computes a^T @ ...; used for G_W = X^T G_Y).
      b: int8 [K, N], or [N, K] with transpose_b (computes ... @ b^T; used for G_X = G_Y W^T).
      a_scale: optional [M] per-row scale (float); b_scale: optional [N] per-column scale.
      out_dtype: float dtype, or int32 when no scale is given (the raw accumulator).
      config: Int8MatmulConfig (Pallas-Triton); pick_config(M, N, K) when None. A
        MosaicInt8Config runs the Hopper wgmma kernel (int8_matmul_mosaic), which reads both
        operands K-major: a transposed a, or an untransposed b, is copied to that layout first.
      interpret: run the kernel in the Pallas interpreter (CPU tests).
    Returns:
      [M, N] out_dtype: (a @ b as int32) * a_scale[:, None] * b_scale[None, :].

    With config.split_k > 1 each output tile is summed over split_k slices of K by separate
    programs into int32 partials [split_k, M, N], which XLA adds and rescales in one fused pass:
    the weight-gradient GEMMs of a CNN (small M x N, K = batch * H * W) otherwise give a grid of a
    few programs for 132 multiprocessors. Integer partial sums make the split exact.
    """
    m, n, k = _check_inputs(a, b, a_scale, b_scale, transpose_a, transpose_b, out_dtype)
    if 0 in (m, n, k):  # nothing to launch: an empty output, or K = 0's zero sums (scaled)
        return int8_matmul_reference(
            a,
            b,
            a_scale,
            b_scale,
            transpose_a=transpose_a,
            transpose_b=transpose_b,
            out_dtype=out_dtype,
        )
    if config is None:
        config = pick_config(m, n, k, transpose_a, interpret)
    if isinstance(config, MosaicInt8Config):
        a_mk = a.T if transpose_a else a
        b_nk = b if transpose_b else b.T
        return int8_matmul_nt(
            a_mk, b_nk, a_scale, b_scale, out_dtype=out_dtype, config=config, interpret=interpret
        )
    config.validate()
    bm, bn, bk, split_k = config.block_m, config.block_n, config.block_k, config.split_k
    a, b = _split_operands(a, b, transpose_a, transpose_b, bm, bn, bk, split_k)
    mp, np_ = pl.cdiv(m, bm) * bm, pl.cdiv(n, bn) * bn
    k_split = (a.shape[0] if transpose_a else a.shape[1]) // split_k
    num_m, num_n = mp // bm, np_ // bn
    fused_epilogue = split_k == 1

    ids = functools.partial(_block_ids, num_m=num_m, num_n=num_n, group_m=config.group_m)

    def a_map(pid, s):
        i, _ = ids(pid)
        return (s, i) if transpose_a else (i, s)

    def b_map(pid, s):
        _, j = ids(pid)
        return (j, s) if transpose_b else (s, j)

    in_specs = [
        pl.BlockSpec((k_split, bm) if transpose_a else (bm, k_split), a_map),
        pl.BlockSpec((bn, k_split) if transpose_b else (k_split, bn), b_map),
    ]
    operands = [a, b]
    if fused_epilogue and a_scale is not None:
        operands.append(pad_to(a_scale.astype(jnp.float32), (bm,)))
        in_specs.append(pl.BlockSpec((bm,), lambda pid, s: (ids(pid)[0],)))
    if fused_epilogue and b_scale is not None:
        operands.append(pad_to(b_scale.astype(jnp.float32), (bn,)))
        in_specs.append(pl.BlockSpec((bn,), lambda pid, s: (ids(pid)[1],)))

    if fused_epilogue:
        out_spec = pl.BlockSpec((bm, bn), lambda pid, s: ids(pid))
        out_shape = jax.ShapeDtypeStruct((mp, np_), out_dtype)
    else:
        out_spec = pl.BlockSpec((None, bm, bn), lambda pid, s: (s, *ids(pid)))
        out_shape = jax.ShapeDtypeStruct((split_k, mp, np_), jnp.int32)
    kernel = functools.partial(
        int8_matmul_kernel,
        block_k=bk,
        num_k=k_split // bk,
        transpose_a=transpose_a,
        transpose_b=transpose_b,
        has_a_scale=fused_epilogue and a_scale is not None,
        has_b_scale=fused_epilogue and b_scale is not None,
        out_dtype=jnp.dtype(out_dtype) if fused_epilogue else jnp.dtype(jnp.int32),
    )
    with caller_independent_locations():
        out = pl.pallas_call(
            kernel,
            grid=(num_m * num_n, split_k),
            in_specs=in_specs,
            out_specs=out_spec,
            out_shape=out_shape,
            compiler_params=TritonCompilerParams(
                num_warps=config.num_warps, num_stages=config.num_stages
            ),
            interpret=interpret,
            name="int8_matmul",
        )(*operands)
    if fused_epilogue:
        return out[:m, :n] if (mp, np_) != (m, n) else out
    return scale_accumulator(out.sum(axis=0)[:m, :n], a_scale, b_scale, out_dtype)
