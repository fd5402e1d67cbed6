"""INT8 convolutions: the custom_vjp `quant_conv_general_dilated` and the Flax module.

Forward: int8 x int8 -> int32 `lax.conv_general_dilated` (XLA CPU supports int8 operands with
`preferred_element_type=int32`; so do the transposed forms below), rescaled by the two
per-tensor scales.

On GPU, XLA lowers integer convs to cuDNN, which rejects int8 x int8 -> int32 (checked on an
H200: "Can't lower one or more integer convolutions to idioms supported by CuDNN"). There the
integer products run as float32 convs (precision HIGHEST) on the int8 codes, which float32 holds
exactly, and are rounded back to int32. That is exact while every partial sum stays below 2^24,
which holds for sums of up to 1040 products (1040 * 127^2 < 2^24); longer sums (G_W over a large
N*H*W) carry float32 rounding of relative size ~1e-7, far below the INT8 quantization error.
`Recipe.gpu_conv_operands="bfloat16"` feeds cuDNN the codes as bfloat16 instead, still with
float32 accumulation: bfloat16 also holds every int8 value exactly and the products of two are
exact in float32, so the sums are the float32 path's (up to summation order), but they run on the
tensor cores at the bf16 rate instead of float32's. Opt-in until timed on a GPU.
The dense products have no such caveat: they use the Pallas INT8 kernel on GPU.

Backward: the two transposed convolutions, written with `lax.conv_general_dilated` on int8
operands so they accumulate exactly in int32. JAX's own transpose rules cannot be used for this:
`jax.vjp` of an integer conv gives float0 (zero) cotangents. The formulas are the standard ones
(they are what `jax.vjp` of the float conv computes; tests/quant/test_conv.py checks ours against
it on float operands for strides, dilations, explicit/SAME/VALID padding, groups and NCHW layouts):

* G_X = conv(G_Y, W spatially reversed with in/out features swapped), window strides and input
  dilation exchanged, padding (k_d - 1 - lo, in_d + k_d - 1 - out_d - (k_d - 1 - lo)) where
  k_d, in_d, out_d are the dilated kernel, input and output sizes. With feature groups G, the
  kernel's O axis is split (G, O/G) and G is folded into I (group-major).
* G_W = conv(X as lhs with batch and feature roles swapped, G_Y as the kernel), window strides and
  kernel dilation exchanged, padding (lo, out_d - in_d + k_d - 1 - lo); feature groups become
  batch groups.

The per-output-channel GVQ scale of G_Y multiplies G_W along its O axis: the sum of G_W[..., o]
runs over batch and output positions only.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from alijax.quant import _op
from alijax.quant.dot_general import _module_state


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Everything static about one convolution, canonicalised (explicit padding, tuples)."""

    lhs_shape: tuple[int, ...]
    rhs_shape: tuple[int, ...]
    window_strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    dimension_numbers: lax.ConvDimensionNumbers
    feature_group_count: int

    @property
    def out_channel_axis(self) -> int:
        return self.dimension_numbers.out_spec[1]

    @property
    def rhs_channel_axis(self) -> int:
        return self.dimension_numbers.rhs_spec[0]

    @property
    def num_out_channels(self) -> int:
        return self.rhs_shape[self.rhs_channel_axis]


def conv_geometry(
    lhs_shape,
    rhs_shape,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
) -> ConvGeometry:
    """Validates and canonicalises `lax.conv_general_dilated` arguments into a ConvGeometry."""
    lhs_shape, rhs_shape = tuple(lhs_shape), tuple(rhs_shape)
    if len(lhs_shape) != len(rhs_shape) or len(lhs_shape) < 3:
        raise ValueError(f"{lhs_shape=} and {rhs_shape=} must have the same rank >= 3")
    if batch_group_count != 1:
        raise ValueError(f"{batch_group_count=} is not supported by the INT8 conv (must be 1)")
    nsp = len(lhs_shape) - 2
    dnums = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)

    def spatial(name, value):
        value = (1,) * nsp if value is None else tuple(int(v) for v in value)
        if len(value) != nsp or min(value) < 1:
            raise ValueError(f"{name}={value} must hold {nsp} positive ints")
        return value

    strides = spatial("window_strides", window_strides)
    lhs_dil = spatial("lhs_dilation", lhs_dilation)
    rhs_dil = spatial("rhs_dilation", rhs_dilation)
    if isinstance(padding, str):
        if any(d != 1 for d in lhs_dil):
            raise ValueError(f"{padding=} as a string needs lhs_dilation of ones, got {lhs_dil}")
        kernel = [_dilate(rhs_shape[a], d) for a, d in zip(dnums.rhs_spec[2:], rhs_dil)]
        inputs = [lhs_shape[a] for a in dnums.lhs_spec[2:]]
        pads = tuple(tuple(p) for p in lax.padtype_to_pads(inputs, kernel, strides, padding))
    else:
        try:
            pads = tuple((operator.index(lo), operator.index(hi)) for lo, hi in padding)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{padding=} must be a string or a sequence of (lo, hi) ints") from err
        if len(pads) != nsp:
            raise ValueError(f"{padding=} must have {nsp} (lo, hi) pairs")
    in_features = lhs_shape[dnums.lhs_spec[1]]
    groups = int(feature_group_count)
    if groups < 1 or in_features % groups or rhs_shape[dnums.rhs_spec[0]] % groups:
        raise ValueError(f"{feature_group_count=} must divide the input and output features")
    if rhs_shape[dnums.rhs_spec[1]] * groups != in_features:
        raise ValueError(
            f"kernel input features {rhs_shape[dnums.rhs_spec[1]]} x {feature_group_count=} "
            f"!= lhs features {in_features}"
        )
    return ConvGeometry(lhs_shape, rhs_shape, strides, pads, lhs_dil, rhs_dil, dnums, groups)


def _dilate(size: int, dilation: int) -> int:
    return 0 if size == 0 else 1 + dilation * (size - 1)


def _spatial_sizes(geo: ConvGeometry, out_shape):
    dn = geo.dimension_numbers
    k_d = [_dilate(geo.rhs_shape[a], d) for a, d in zip(dn.rhs_spec[2:], geo.rhs_dilation)]
    in_d = [_dilate(geo.lhs_shape[a], d) for a, d in zip(dn.lhs_spec[2:], geo.lhs_dilation)]
    out_d = [_dilate(out_shape[a], s) for a, s in zip(dn.out_spec[2:], geo.window_strides)]
    return k_d, in_d, out_d


def _emulate_integer_conv() -> bool:
    """True where integer convs must run in float32 (GPU: cuDNN has no int8 -> int32 conv)."""
    return jax.default_backend() == "gpu"


GPU_CONV_OPERANDS = ("float32", "bfloat16")


def _conv(lhs, rhs, out_dtype, gpu_operands="float32", **kwargs):
    """lax.conv_general_dilated with int8 operands accumulated to int32 on every backend.
    gpu_operands: the float dtype the codes take where integer convs are emulated."""
    if lhs.dtype == jnp.int8 and _emulate_integer_conv():
        as_float = jnp.dtype(gpu_operands)
        out = lax.conv_general_dilated(
            lhs.astype(as_float),
            rhs.astype(as_float),
            # HIGHEST keeps float32 from dropping to TF32 (whose 10-bit mantissa would round the
            # codes' products); bfloat16 products are exact at any precision.
            precision=lax.Precision.HIGHEST if as_float == jnp.float32 else None,
            preferred_element_type=jnp.float32,
            **kwargs,
        )
        return jnp.round(out).astype(jnp.int32)
    return lax.conv_general_dilated(
        lhs, rhs, precision=_precision(out_dtype), preferred_element_type=out_dtype, **kwargs
    )


def _precision(out_dtype):
    # Integer products are exact whatever the precision; float ones (telemetry, tests) want f32.
    return None if jnp.issubdtype(out_dtype, jnp.integer) else lax.Precision.HIGHEST


def _swap01(spec):
    return (spec[1], spec[0]) + tuple(spec[2:])


def conv_forward(geo: ConvGeometry, x, w, out_dtype, gpu_operands="float32"):
    """Y = conv(X, W). int8 operands accumulate exactly in int32."""
    return _conv(
        x,
        w,
        out_dtype,
        gpu_operands,
        window_strides=geo.window_strides,
        padding=geo.padding,
        lhs_dilation=geo.lhs_dilation,
        rhs_dilation=geo.rhs_dilation,
        dimension_numbers=geo.dimension_numbers,
        feature_group_count=geo.feature_group_count,
    )


def conv_grad_lhs(geo: ConvGeometry, g, w, out_dtype, gpu_operands="float32"):
    """G_X from G_Y (out layout) and W (rhs layout); returns the lhs layout."""
    dn = geo.dimension_numbers
    k_d, in_d, out_d = _spatial_sizes(geo, g.shape)
    pads = []
    for (lo, _), kk, ii, oo in zip(geo.padding, k_d, in_d, out_d):
        before = kk - 1 - lo
        pads.append((before, ii + kk - 1 - oo - before))
    # Canonical kernel layout [O, I, *spatial], spatially reversed: the adjoint of a correlation.
    spatial = tuple(range(2, w.ndim))
    kernel = jnp.flip(jnp.transpose(w, dn.rhs_spec), spatial)
    groups = geo.feature_group_count
    o, i = kernel.shape[:2]
    if groups > 1:
        # [O, I/G, ...] -> [O/G, G*I/G, ...]: each group's O/G gradient channels map back onto
        # that group's inputs, which sit group-major along the folded I axis.
        kernel = jnp.reshape(kernel, (groups, o // groups, i) + kernel.shape[2:])
        kernel = jnp.swapaxes(kernel, 0, 1)
        kernel = jnp.reshape(kernel, (o // groups, groups * i) + kernel.shape[3:])
    # Its dim 0 now plays "input features" (the gradient channels), dim 1 "output features".
    trans = lax.ConvDimensionNumbers(dn.out_spec, (1, 0) + spatial, dn.lhs_spec)
    return _conv(
        g,
        kernel,
        out_dtype,
        gpu_operands,
        window_strides=geo.lhs_dilation,
        padding=pads,
        lhs_dilation=geo.window_strides,
        rhs_dilation=geo.rhs_dilation,
        dimension_numbers=trans,
        feature_group_count=groups,
    )


def conv_grad_rhs(geo: ConvGeometry, x, g, out_dtype, gpu_operands="float32"):
    """G_W from X (lhs layout) and G_Y (out layout); returns the rhs layout."""
    dn = geo.dimension_numbers
    k_d, in_d, out_d = _spatial_sizes(geo, g.shape)
    pads = [
        (lo, oo - ii + kk - 1 - lo) for (lo, _), kk, ii, oo in zip(geo.padding, k_d, in_d, out_d)
    ]
    trans = lax.ConvDimensionNumbers(
        _swap01(dn.lhs_spec), _swap01(dn.out_spec), _swap01(dn.rhs_spec)
    )
    return _conv(
        x,
        g,
        out_dtype,
        gpu_operands,
        window_strides=geo.rhs_dilation,
        padding=pads,
        lhs_dilation=geo.lhs_dilation,
        rhs_dilation=geo.window_strides,
        dimension_numbers=trans,
        batch_group_count=geo.feature_group_count,
    )


@dataclasses.dataclass(frozen=True)
class ConvProducts:
    """The three products of Y = conv(X, W) for the shared INT8 op (alijax/quant/_op.py)."""

    geometry: ConvGeometry
    gpu_operands: str = "float32"  # Recipe.gpu_conv_operands

    @property
    def out_channel_axis(self) -> int:
        return self.geometry.out_channel_axis

    @property
    def rhs_channel_axis(self) -> int:
        return self.geometry.rhs_channel_axis

    def forward(self, x, w, out_dtype):
        return conv_forward(self.geometry, x, w, out_dtype, self.gpu_operands)

    def grad_lhs(self, g, w, out_dtype):
        return conv_grad_lhs(self.geometry, g, w, out_dtype, self.gpu_operands)

    def grad_rhs(self, x, g, out_dtype):
        return conv_grad_rhs(self.geometry, x, g, out_dtype, self.gpu_operands)


def quant_conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    *,
    recipe,
    state: dict | None = None,
    seed: int = 0,
) -> jax.Array:
    """INT8 `lax.conv_general_dilated` with the DA-INT8 backward (same signature plus recipe).

    state: the layer's overwrite state (_op.init_state); None uses a fresh one whose "gradient"
    is dropped (no clip tracking across steps, no telemetry).
    """
    del precision  # the integer product is exact
    geo = conv_geometry(
        lhs.shape,
        rhs.shape,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
    )
    if state is None:
        recipe = dataclasses.replace(recipe, telemetry=False)
        state = _op.init_state(_op.state_channels(recipe, geo.num_out_channels))
    products = ConvProducts(geo, recipe.gpu_conv_operands)
    y = _op.quantized_product(products, recipe, seed, lhs, rhs, state)
    return y.astype(preferred_element_type or jnp.result_type(lhs, rhs))


class QuantConv(nn.Module):
    """A `conv_general_dilated_cls` for nn.Conv: INT8 conv with stateful clipping.

    Owns its clip state and telemetry in the `quant_state` collection (see overwrite.py).
    Call at most once per differentiated forward.
    """

    recipe: Any

    @nn.compact
    def __call__(
        self,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=None,
        rhs_dilation=None,
        dimension_numbers=None,
        feature_group_count: int = 1,
        batch_group_count: int = 1,
        precision=None,
        preferred_element_type=None,
    ):
        dnums = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        out_channels = rhs.shape[dnums.rhs_spec[0]]
        state = _module_state(self, _op.state_channels(self.recipe, out_channels))
        return quant_conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            batch_group_count,
            precision,
            preferred_element_type,
            recipe=self.recipe,
            state=state,
            seed=_op.layer_seed(self.scope.path, self.recipe.seed),
        )


def bf16_conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
):
    """`lax.conv_general_dilated` on bfloat16 operands with float32 accumulation (bf16 recipe)."""
    out = lax.conv_general_dilated(
        lhs.astype(jnp.bfloat16),
        rhs.astype(jnp.bfloat16),
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))
