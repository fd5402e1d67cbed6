"""What the kernels share: the Pallas-Triton names that moved between jax releases, tile-size
checks, zero-padding operands up to their tiles, and the dequantising epilogue when XLA, not the
kernel, applies it (the reference, and the sum of split-K partials)."""

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# jax renamed TritonCompilerParams -> CompilerParams; accept either so the files run on both.
TritonCompilerParams = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
# dot moved from pallas to pallas.triton; older releases only have pl.dot.
triton_dot = getattr(plgpu, "dot", None) or pl.dot


def is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def pad_to(x, multiples):
    """Zero-pads each dim of x up to a multiple of multiples[d] (exact for int8 products: zero
    rows and columns add nothing to the int32 sums); x itself when nothing is padded."""
    pads = [(0, (-d) % mlt) for d, mlt in zip(x.shape, multiples)]
    if all(p == (0, 0) for p in pads):
        return x
    return jnp.pad(x, pads)


def scale_accumulator(acc, a_scale, b_scale, out_dtype):
    """int32 [M, N] -> out_dtype, scales applied in float32 (row scale first, then column), the
    order the fused kernel epilogues use, so results agree bit for bit."""
    if a_scale is None and b_scale is None:
        return acc.astype(out_dtype)
    y = acc.astype(jnp.float32)
    if a_scale is not None:
        y = y * a_scale.astype(jnp.float32)[:, None]
    if b_scale is not None:
        y = y * b_scale.astype(jnp.float32)[None, :]
    return y.astype(out_dtype)
