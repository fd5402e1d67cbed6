"""INT8 dense layers: `int8_dot`, the custom_vjp `quant_dot_general`, and the Flax module.

`quant_dot_general(lhs, rhs, dimension_numbers, ...)` accepts any `lax.dot_general` dimension
numbers. It moves the operands to the canonical batched matmul [B, M, K] x [B, K, N] (batch dims,
then lhs free dims, then contracting dims; rhs: batch, contracting, free), runs the INT8 op of
alijax/quant/_op.py there, and reshapes the result to dot_general's output layout
(batch..., lhs free..., rhs free...). The transposes are outside the custom_vjp, so JAX transposes
them in the backward; the output channels for GVQ are the N (rhs free) columns.

Every integer product goes through `int8_dot`: the Pallas INT8 kernel on GPU
(pallas_kernels.int8_matmul), `lax.dot_general` with int32 accumulation elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from alijax.quant import _op


def int8_dot(
    a: jax.Array,
    b: jax.Array,
    *,
    transpose_a: bool = False,
    transpose_b: bool = False,
    use_kernel: bool | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Exact int8 x int8 -> int32 batched matmul.

    a: int8 [B, M, K] ([B, K, M] if transpose_a); b: int8 [B, K, N] ([B, N, K] if transpose_b).
    2-D operands are treated as B = 1 and give a 2-D result. Returns int32 [B, M, N].
    use_kernel: None picks the Pallas kernel when jax.default_backend() == "gpu";
    interpret runs that kernel in the Pallas interpreter (tests on CPU).
    """
    if a.dtype != jnp.int8 or b.dtype != jnp.int8:
        raise ValueError(f"a.dtype={a.dtype} and b.dtype={b.dtype} must both be int8")
    if a.ndim != b.ndim or a.ndim not in (2, 3):
        raise ValueError(f"{a.shape=} and {b.shape=} must both be 2-D or both 3-D")
    if a.ndim == 2:
        return int8_dot(
            a[None],
            b[None],
            transpose_a=transpose_a,
            transpose_b=transpose_b,
            use_kernel=use_kernel,
            interpret=interpret,
        )[0]
    k_a = a.shape[1] if transpose_a else a.shape[2]
    k_b = b.shape[2] if transpose_b else b.shape[1]
    if a.shape[0] != b.shape[0] or k_a != k_b:
        raise ValueError(
            f"batch or contraction sizes differ: {a.shape=}, {b.shape=}, {transpose_a=}, "
            f"{transpose_b=}"
        )
    if use_kernel is None:
        use_kernel = jax.default_backend() == "gpu"
    if use_kernel:
        from pallas_kernels.int8_matmul import int8_matmul  # GPU-only import path

        def one(a2, b2):
            return int8_matmul(
                a2,
                b2,
                transpose_a=transpose_a,
                transpose_b=transpose_b,
                out_dtype=jnp.int32,
                interpret=interpret,
            )

        return one(a[0], b[0])[None] if a.shape[0] == 1 else jax.vmap(one)(a, b)
    if transpose_a and jax.default_backend() == "cpu":
        # XLA:CPU's int8 dot contracting A's major axis ran 20-35x slower than on A^T copied
        # (G_W = X^T G_Y, 2 cores, 2026-12-06: M=4096 K=1024 N=1024 175 ms against 5.0;
        # M=1024 K=512 N=1000 21.5 against 0.75). A plain transpose is folded into the dot's
        # dimension numbers, and the flattening behind a barrier makes it a copy.
        a = _physically(jnp.swapaxes(a, 1, 2))
        transpose_a = False
    dims = (((1 if transpose_a else 2,), (2 if transpose_b else 1,)), ((0,), (0,)))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.int32)


def _physically(a: jax.Array) -> jax.Array:
    """a, stored in its logical layout: XLA may otherwise fold a transpose producing it into the
    layout its consumer reads (see int8_dot)."""
    return lax.optimization_barrier(a.reshape(-1)).reshape(a.shape)


def _float_dot(a, b, transpose_a, transpose_b, out_dtype):
    dims = (((1 if transpose_a else 2,), (2 if transpose_b else 1,)), ((0,), (0,)))
    return lax.dot_general(
        a.astype(jnp.float32),
        b.astype(jnp.float32),
        dims,
        precision=lax.Precision.HIGHEST,
        preferred_element_type=out_dtype,
    )


@dataclasses.dataclass(frozen=True)
class DenseProducts:
    """The three products of Y = X W on canonical operands X [B, M, K], W [B, K, N]."""

    out_channel_axis: int = 2
    rhs_channel_axis: int = 2

    @staticmethod
    def _dot(a, b, transpose_a, transpose_b, out_dtype):
        if a.dtype == jnp.int8 and b.dtype == jnp.int8:
            return int8_dot(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
        return _float_dot(a, b, transpose_a, transpose_b, out_dtype)

    def forward(self, x, w, out_dtype):
        return self._dot(x, w, False, False, out_dtype)

    def grad_lhs(self, g, w, out_dtype):  # [B, M, N] x [B, K, N]^T -> [B, M, K]
        return self._dot(g, w, False, True, out_dtype)

    def grad_rhs(self, x, g, out_dtype):  # [B, M, K]^T x [B, M, N] -> [B, K, N]
        return self._dot(x, g, True, False, out_dtype)


@dataclasses.dataclass(frozen=True)
class _DotLayout:
    """How dot_general's operands map onto [B, M, K] x [B, K, N] and back."""

    lhs_perm: tuple[int, ...]
    rhs_perm: tuple[int, ...]
    bmk: tuple[int, int, int]
    kn: tuple[int, int]
    out_shape: tuple[int, ...]


def _dot_layout(lhs_shape, rhs_shape, dimension_numbers) -> _DotLayout:
    try:
        (lc, rc), (lb, rb) = dimension_numbers
        lc, rc, lb, rb = (tuple(int(a) for a in t) for t in (lc, rc, lb, rb))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{dimension_numbers=} must be ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))"
        ) from err
    for name, axes, rank in (("lhs", lc + lb, len(lhs_shape)), ("rhs", rc + rb, len(rhs_shape))):
        if any(not -rank <= a < rank for a in axes):  # (taken modulo the rank, 3 ran as 1)
            raise ValueError(f"{dimension_numbers=} names {name} axes beyond its rank {rank}")
    lc = tuple(a % len(lhs_shape) for a in lc)
    lb = tuple(a % len(lhs_shape) for a in lb)
    rc = tuple(a % len(rhs_shape) for a in rc)
    rb = tuple(a % len(rhs_shape) for a in rb)
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise ValueError(f"{dimension_numbers=} pairs contracting/batch dims of unequal count")
    for name, la, ra in (("contracting", lc, rc), ("batch", lb, rb)):
        lsz = tuple(lhs_shape[a] for a in la)
        rsz = tuple(rhs_shape[a] for a in ra)
        if lsz != rsz:
            raise ValueError(f"{name} dims differ: lhs {lsz} vs rhs {rsz} ({dimension_numbers=})")
    lf = tuple(a for a in range(len(lhs_shape)) if a not in lc + lb)
    rf = tuple(a for a in range(len(rhs_shape)) if a not in rc + rb)
    size = lambda shape, axes: math.prod(shape[a] for a in axes)  # noqa: E731
    b, m, k, n = size(lhs_shape, lb), size(lhs_shape, lf), size(lhs_shape, lc), size(rhs_shape, rf)
    out_shape = tuple(lhs_shape[a] for a in lb + lf) + tuple(rhs_shape[a] for a in rf)
    return _DotLayout(lb + lf + lc, rb + rc + rf, (b, m, k), (k, n), out_shape)


def quant_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers,
    *,
    recipe,
    state: dict | None = None,
    seed: int = 0,
    preferred_element_type=None,
) -> jax.Array:
    """INT8 `lax.dot_general` with the DA-INT8 backward (see module docstring).

    state: the layer's overwrite state (_op.init_state); None uses a fresh one whose "gradient"
    is dropped (no clip tracking across steps, no telemetry). Returns the dot_general output in
    `preferred_element_type`, or in the operands' result dtype.
    """
    layout = _dot_layout(lhs.shape, rhs.shape, dimension_numbers)
    b, m, k = layout.bmk
    x3 = jnp.reshape(jnp.transpose(lhs, layout.lhs_perm), (b, m, k))
    w3 = jnp.reshape(jnp.transpose(rhs, layout.rhs_perm), (b,) + layout.kn)
    if state is None:
        recipe = dataclasses.replace(recipe, telemetry=False)
        state = _op.init_state(_op.state_channels(recipe, layout.kn[1]))
    y3 = _op.quantized_product(DenseProducts(), recipe, seed, x3, w3, state)
    out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    return jnp.reshape(y3, layout.out_shape).astype(out_dtype)


def dense_out_channels(rhs_shape, dimension_numbers) -> int:
    """Number of output channels (rhs free size) for a dot_general: the GVQ channel count."""
    (_, rc), (_, rb) = dimension_numbers
    rc = tuple(a % len(rhs_shape) for a in rc)
    rb = tuple(a % len(rhs_shape) for a in rb)
    return math.prod(s for a, s in enumerate(rhs_shape) if a not in rc + rb)


class QuantDotGeneral(nn.Module):
    """A `dot_general_cls` for nn.Dense / nn.DenseGeneral: INT8 product with stateful clipping.

    Owns its clip state and telemetry in the `quant_state` collection (see overwrite.py).
    Call at most once per differentiated forward.
    """

    recipe: Any

    @nn.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del precision  # the integer product is exact; precision has no meaning for it
        channels = _op.state_channels(self.recipe, dense_out_channels(rhs.shape, dimension_numbers))
        state = _module_state(self, channels)
        return quant_dot_general(
            lhs,
            rhs,
            dimension_numbers,
            recipe=self.recipe,
            state=state,
            seed=_op.layer_seed(self.scope.path, self.recipe.seed),
            preferred_element_type=preferred_element_type,
        )


def _module_state(module: nn.Module, channels: int) -> dict:
    """Reads (creating at init) a layer's overwrite-collection variables."""
    init = _op.init_state(channels)
    values = {
        name: module.variable(_op.OVERWRITE_COLLECTION, name, lambda v=value: v).value
        for name, value in init.items()
    }
    if values["clip"].shape != (channels,):
        raise ValueError(
            f"stored clip state has shape {values['clip'].shape} but the layer needs ({channels},)"
        )
    return values


def bf16_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` on bfloat16 operands with float32 accumulation (the bf16 recipe)."""
    out = lax.dot_general(
        lhs.astype(jnp.bfloat16),
        rhs.astype(jnp.bfloat16),
        dimension_numbers,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))
