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
  Int8MatmulConfig, default_config(m, n, k)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# jax renamed TritonCompilerParams -> CompilerParams; accept either so the file runs on both.
_CompilerParams = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
# dot moved from pallas to pallas.triton; older releases only have pl.dot.
_dot = getattr(plgpu, "dot", None) or pl.dot


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


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

    def validate(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not (_is_pow2(v) and v >= 16):
                raise ValueError(f"config.{name}={v} must be a power of two >= 16")
        if not _is_pow2(self.num_warps):
            raise ValueError(f"config.num_warps={self.num_warps} must be a power of two")
        if self.num_stages < 1:
            raise ValueError(f"config.num_stages={self.num_stages} must be >= 1")
        if self.group_m < 1:
            raise ValueError(f"config.group_m={self.group_m} must be >= 1")


def _pick_block(dim: int, choices: tuple[int, ...]) -> int:
    """Largest choice dividing ``dim``; else the smallest choice >= dim; else the largest."""
    for c in choices:
        if dim % c == 0:
            return c
    fitting = [c for c in choices if c >= dim]
    return min(fitting) if fitting else choices[0]


def default_config(m: int, n: int, k: int) -> Int8MatmulConfig:
    """A per-shape default. Large tiles for large GEMMs (tensor-core bound), smaller tiles when
    a dim is small so little work is padding; block_k chosen to divide K when possible."""
    big = m >= 2048 and n >= 2048
    block_m = _pick_block(m, (128, 64, 32, 16))
    block_n = _pick_block(n, (256, 128, 64, 32, 16) if big else (128, 64, 32, 16))
    block_k = _pick_block(k, (128, 64, 32))
    num_warps = 8 if block_m * block_n >= 128 * 256 else 4
    return Int8MatmulConfig(
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        num_warps=num_warps,
        num_stages=3 if block_k >= 128 else 4,
        group_m=8,
    )


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
    if a_scale is not None and tuple(a_scale.shape) != (m,):
        raise ValueError(f"a_scale.shape={tuple(a_scale.shape)} must be (M,)=({m},)")
    if b_scale is not None and tuple(b_scale.shape) != (n,):
        raise ValueError(f"b_scale.shape={tuple(b_scale.shape)} must be (N,)=({n},)")
    out_dtype = jnp.dtype(out_dtype)
    if (a_scale is not None or b_scale is not None) and not jnp.issubdtype(out_dtype, jnp.floating):
        raise ValueError(f"out_dtype={out_dtype} must be floating when a scale is given")
    if not (jnp.issubdtype(out_dtype, jnp.floating) or out_dtype == jnp.int32):
        raise ValueError(f"out_dtype={out_dtype} must be a float dtype or int32")
    return m, n, ka


def _epilogue(acc, a_scale, b_scale, out_dtype):
    """int32 [M, N] -> out_dtype, scales applied in float32 (row scale first, then column)."""
    if a_scale is None and b_scale is None:
        return acc.astype(out_dtype)
    y = acc.astype(jnp.float32)
    if a_scale is not None:
        y = y * a_scale.astype(jnp.float32)[:, None]
    if b_scale is not None:
        y = y * b_scale.astype(jnp.float32)[None, :]
    return y.astype(out_dtype)


def int8_matmul_reference(
    a, b, a_scale=None, b_scale=None, *, transpose_a=False, transpose_b=False, out_dtype=jnp.float32
):
    """Plain-jnp reference. a: [M, K] (or [K, M] if transpose_a), b: [K, N] (or [N, K] if
    transpose_b), a_scale: [M], b_scale: [N] -> [M, N] out_dtype."""
    _check_inputs(a, b, a_scale, b_scale, transpose_a, transpose_b, out_dtype)
    dims = (((0 if transpose_a else 1,), (1 if transpose_b else 0,)), ((), ()))
    acc = lax.dot_general(a, b, dims, preferred_element_type=jnp.int32)
    return _epilogue(acc, a_scale, b_scale, out_dtype)


def _block_ids(pid, num_m, num_n, group_m):
    """Grouped launch order: consecutive programs walk down ``group_m`` rows of output blocks
    before moving right, so the B panel and group_m A panels are reused from L2."""
    group_size = group_m * num_n
    group = pid // group_size
    first_m = group * group_m
    rows_in_group = jnp.minimum(num_m - first_m, group_m)
    i = first_m + (pid % group_size) % rows_in_group
    j = (pid % group_size) // rows_in_group
    return i, j


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
        return acc + _dot(a, b, trans_a=transpose_a, trans_b=transpose_b)

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


def _pad_to(x, multiples):
    pads = [(0, (-d) % mlt) for d, mlt in zip(x.shape, multiples)]
    if all(p == (0, 0) for p in pads):
        return x
    return jnp.pad(x, pads)


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
      config: Int8MatmulConfig; default_config(M, N, K) when None.
      interpret: run the kernel in the Pallas interpreter (CPU tests).
    Returns:
      [M, N] out_dtype: (a @ b as int32) * a_scale[:, None] * b_scale[None, :].
    """
    m, n, k = _check_inputs(a, b, a_scale, b_scale, transpose_a, transpose_b, out_dtype)
    cfg = default_config(m, n, k) if config is None else config
    cfg.validate()
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    a = _pad_to(a, (bk, bm) if transpose_a else (bm, bk))
    b = _pad_to(b, (bn, bk) if transpose_b else (bk, bn))
    mp, np_ = pl.cdiv(m, bm) * bm, pl.cdiv(n, bn) * bn
    kp = pl.cdiv(k, bk) * bk
    num_m, num_n = mp // bm, np_ // bn

    ids = functools.partial(_block_ids, num_m=num_m, num_n=num_n, group_m=cfg.group_m)

    def a_map(pid):
        i, _ = ids(pid)
        return (0, i) if transpose_a else (i, 0)

    def b_map(pid):
        _, j = ids(pid)
        return (j, 0) if transpose_b else (0, j)

    in_specs = [
        pl.BlockSpec((kp, bm) if transpose_a else (bm, kp), a_map),
        pl.BlockSpec((bn, kp) if transpose_b else (kp, bn), b_map),
    ]
    operands = [a, b]
    if a_scale is not None:
        operands.append(_pad_to(a_scale.astype(jnp.float32), (bm,)))
        in_specs.append(pl.BlockSpec((bm,), lambda pid: (ids(pid)[0],)))
    if b_scale is not None:
        operands.append(_pad_to(b_scale.astype(jnp.float32), (bn,)))
        in_specs.append(pl.BlockSpec((bn,), lambda pid: (ids(pid)[1],)))

    kernel = functools.partial(
        int8_matmul_kernel,
        block_k=bk,
        num_k=kp // bk,
        transpose_a=transpose_a,
        transpose_b=transpose_b,
        has_a_scale=a_scale is not None,
        has_b_scale=b_scale is not None,
        out_dtype=jnp.dtype(out_dtype),
    )
    out = pl.pallas_call(
        kernel,
        grid=(num_m * num_n,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), ids),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        compiler_params=_CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="int8_matmul",
    )(*operands)
    if (mp, np_) != (m, n):
        out = out[:m, :n]
    return out
