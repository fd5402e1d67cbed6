"""What the kernels share: the Pallas-Triton names that moved between jax releases, tile-size
checks, zero-padding operands up to their tiles, and the dequantising epilogue when XLA, not the
kernel, applies it (the reference, and the sum of split-K partials)."""

import contextlib

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# jax renamed TritonCompilerParams -> CompilerParams; accept either so the files run on both.
TritonCompilerParams = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
# dot moved from pallas to pallas.triton; older releases only have pl.dot.
triton_dot = getattr(plgpu, "dot", None) or pl.dot


try:  # jax's private source-info context; without it kernels keep their callers' locations
    from jax._src import source_info_util as _source_info
except ImportError:  # pragma: no cover (a jax without it)
    _source_info = None


def _fixed_traceback():
    return None if _source_info is None else _source_info.current().traceback


# One traceback for every kernel traced in this process (this module's import stack).
_KERNEL_TRACEBACK = _fixed_traceback()


@contextlib.contextmanager
def caller_independent_locations():
    """Traces a kernel with one fixed source location and an empty name stack.

    A kernel's lowered body embeds the source locations of its operations, and those include
    the caller's frames and transformation names. The same GEMM traced in a model's forward
    and again in its backward (autodiff's frames) then serializes to two bodies with two
    kernel hashes, which the GPU compiles twice: 17 of 59 kernels of a DA-INT8 ResNet-50 step
    (benchmarks/gpu_lowering.py). The price: locations inside kernels all name
    _fixed_traceback. Python errors raised while tracing keep their own tracebacks (the
    context is swapped directly: jax's user_context would attach this fixed stack to them as
    their "source"). Where jax's private context is not as expected, nothing is pinned."""
    context = getattr(_source_info, "_source_info_context", None)
    previous = getattr(context, "context", None)
    if _KERNEL_TRACEBACK is None or not hasattr(previous, "replace"):
        yield
        return
    context.context = previous.replace(
        traceback=_KERNEL_TRACEBACK, name_stack=_source_info.NameStack()
    )
    try:
        yield
    finally:
        context.context = previous


def is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


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
