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

`Recipe.conv_lowering` may instead run each product as one int8 GEMM over the patches of X
(im2col, through int8_dot: the Pallas kernel on GPU; see CONV_LOWERINGS below). Its default,
"auto", does so on CPU wherever XLA:CPU's int8 conv is the slower (its transposed convs take
seconds a layer); on a GPU it stays on the convs until a GPU run has timed both.

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
import itertools
import math
import operator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from alijax.quant import _op
from alijax.quant.dot_general import _module_state, _physically, int8_dot


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


def _dilated_kernel(geo: ConvGeometry) -> list[int]:
    """The kernel's spatial extent with its dilation."""
    dn = geo.dimension_numbers
    return [_dilate(geo.rhs_shape[a], d) for a, d in zip(dn.rhs_spec[2:], geo.rhs_dilation)]


def _spatial_sizes(geo: ConvGeometry, out_shape):
    dn = geo.dimension_numbers
    k_d = _dilated_kernel(geo)
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


def _grad_lhs_padding(geo: ConvGeometry, out_shape) -> tuple[tuple[int, int], ...]:
    """The padding of G_Y in G_X's conv (the module docstring's formula)."""
    k_d, in_d, out_d = _spatial_sizes(geo, out_shape)
    pads = []
    for (lo, _), kk, ii, oo in zip(geo.padding, k_d, in_d, out_d):
        before = kk - 1 - lo
        pads.append((before, ii + kk - 1 - oo - before))
    return tuple(pads)


def _flipped_kernel(geo: ConvGeometry, w):
    """W in the canonical layout [O, I, *spatial], spatially reversed: the adjoint of a
    correlation."""
    return jnp.flip(jnp.transpose(w, geo.dimension_numbers.rhs_spec), tuple(range(2, w.ndim)))


def conv_grad_lhs(geo: ConvGeometry, g, w, out_dtype, gpu_operands="float32"):
    """G_X from G_Y (out layout) and W (rhs layout); returns the lhs layout."""
    dn = geo.dimension_numbers
    pads = _grad_lhs_padding(geo, g.shape)
    spatial = tuple(range(2, w.ndim))
    kernel = _flipped_kernel(geo, w)
    groups = geo.feature_group_count
    o, i = kernel.shape[:2]
    if groups > 1:
        # [O, I/G, ...] -> [O/G, G*I/G, ...]: each group's O/G gradient channels map back onto
        # that group's inputs, which sit group-major along the folded I axis.
        kernel = jnp.reshape(kernel, (groups, o // groups, i) + kernel.shape[2:])
        kernel = jnp.swapaxes(kernel, 0, 1)
        kernel = jnp.reshape(kernel, (o // groups, groups * i) + kernel.shape[3:])
    # Its dim 0 now plays "input features" (the gradient channels), dim 1 "output features".
    # Stored as [*spatial, in, out] (HWIO), physically: XLA folds a transpose into the conv's
    # kernel layout, and XLA:CPU's int8 conv then leaves its fast path (a stride-1 3x3 G_X,
    # 28x28 64->64, batch 32: 410 ms against 1.5 ms, 2 cores, 2026-12-06).
    kernel = _physically(jnp.transpose(kernel, spatial + (0, 1)))
    n_sp = len(spatial)
    trans = lax.ConvDimensionNumbers(
        dn.out_spec, (n_sp + 1, n_sp) + tuple(range(n_sp)), dn.lhs_spec
    )
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


# The im2col lowering (Recipe.conv_lowering="im2col"): each of the three products as one int8
# GEMM through int8_dot, which is the Pallas INT8 kernel on GPU. With K = prod(kernel) * C_in
# (the kernel's taps, then its input channels, row-major as the kernel is laid out) and
# M = N * prod(out):
#   Y   [M, O] = P [M, K] @ W [K, O]        P: the patches of X (_patches)
#   G_X        = P(G_Y) @ W'                stride 1: G_X's conv is a forward conv of G_Y with
#                                           the flipped kernel W', run as its im2col
#   G_X        = col2im(G_Y [M, O] @ W^T)   strided: col2im adds each tap's [M, C] block back
#                                           at the input positions it was read from (_col2im)
#   G_W [K, O] = P^T @ G_Y [M, O]        P^T and G_Y^T built as such, K-major (the NT GEMM)
# The patches cost prod(kernel) times their input's int8 bytes (a 3x3 conv: 9x), and col2im an
# int32 [M, K] product, in exchange for the int8 tensor cores that cuDNN's int8 x int8 -> int32
# conv does not reach. benchmarks/gpu_lowering.py --list prints a ResNet-50 step's GEMMs.
CONV_LOWERINGS = ("auto", "conv", "im2col")


def _lowering_of(lowering: str, product: str, geo: ConvGeometry) -> str:
    """The lowering one product runs. "auto" on CPU: the conv where XLA:CPU runs it on its fast
    int8 path, a conv with no input dilation, several kernel taps, a map no smaller than the
    kernel and at least _CPU_CONV_MIN_OUT output channels: the forward (output channels C_out),
    and G_X of a stride-1 conv, itself such a conv of G_Y (output channels C_in). Else GEMMs:
    G_W always, and G_X of a strided conv, which as a conv dilates G_Y. Measured on 2 cores
    (2026-12-06), batch 32, ms conv / im2col:
    - 56x56 64->64 3x3: forward 7.4 / 52, G_X 4.8 / 79, G_W 7503 / 62;
    - 14x14 256->256 3x3: 3.2 / 5.0, 3.2 / 22, 5879 / 9.4;
    - 56x56 128->128 3x3 stride 2: 6.8 / 24, G_X 1638 / 68;
    - 32x32 16->16 3x3 (under 24 channels): 10.1 / 1.5, 9.9 / 4.0; 1x1 56x56 64->256 (the
      patches are the input itself): 51 / 30, 9.5 / 2.8;
    - batch 128, 2x2 64->64 3x3 (a map smaller than the kernel): 2.6 / 0.2, 2.6 / 0.1.
    (G_X as im2col was col2im there; a stride-1 G_X now runs as the forward im2col of G_Y,
    1.3-2x faster on the same 2 cores: 56x56 64->64 91 against 120 ms, 32x32 16->16 2.4 / 4.4.)
    Elsewhere "auto" is "conv" until a GPU run times the two (benchmarks/int8_step.py,
    variant +im2col)."""
    if lowering != "auto":
        return lowering
    if jax.default_backend() != "cpu":
        return "conv"
    if product == "grad_rhs":
        return "im2col"
    dn = geo.dimension_numbers
    if product == "forward":
        out_channels = geo.num_out_channels
    elif all(s == 1 for s in geo.window_strides):  # grad_lhs: a conv without input dilation
        out_channels = geo.lhs_shape[dn.lhs_spec[1]]
    else:
        return "im2col"
    several_taps = math.prod(_kernel_sizes(geo)) > 1
    # Inputs smaller than the kernel (a 2x2 map under a 3x3 kernel) left the fast path too.
    in_d = [geo.lhs_shape[a] for a in dn.lhs_spec[2:]]
    covers_kernel = all(i >= k for i, k in zip(in_d, _dilated_kernel(geo)))
    fast = several_taps and covers_kernel and out_channels >= _CPU_CONV_MIN_OUT
    return "conv" if fast else "im2col"


_CPU_CONV_MIN_OUT = 24  # below it XLA:CPU's int8 forward conv left its fast path (measured)


def im2col_applies(geo: ConvGeometry) -> bool:
    """Whether the im2col lowering covers this conv: one feature group, no input dilation
    (a transposed conv's form), and a non-empty output. Others stay on the conv lowering."""
    if geo.feature_group_count != 1 or any(d != 1 for d in geo.lhs_dilation):
        return False
    return min(_im2col_out_sizes(geo), default=1) >= 1 and 0 not in geo.lhs_shape


def _kernel_sizes(geo: ConvGeometry) -> tuple[int, ...]:
    return tuple(geo.rhs_shape[a] for a in geo.dimension_numbers.rhs_spec[2:])


def _im2col_out_sizes(geo: ConvGeometry) -> tuple[int, ...]:
    dn = geo.dimension_numbers
    parts = zip(dn.lhs_spec[2:], geo.padding, _dilated_kernel(geo), geo.window_strides)
    return tuple((geo.lhs_shape[a] + lo + hi - k) // s + 1 for a, (lo, hi), k, s in parts)


def _lhs_order(dn):  # lhs / out axes in channels-last order: batch, spatial..., features
    return (dn[0], *dn[2:], dn[1])


def _rhs_order(dn):  # kernel axes in [spatial..., in features, out features] order
    return (*dn[2:], dn[1], dn[0])


def _from_order(a, order):
    """Undoes jnp.transpose(., order): a array in `order`'s axis order -> the original layout."""
    return jnp.transpose(a, tuple(int(i) for i in np.argsort(order)))


def _tap_windows(geo: ConvGeometry):
    """Per kernel tap (row-major over the kernel's spatial axes): the padded input's window it
    reads, as (starts, limits) over the padded spatial axes, with the window strides as step."""
    out = _im2col_out_sizes(geo)
    for tap in itertools.product(*(range(k) for k in _kernel_sizes(geo))):
        starts = tuple(t * d for t, d in zip(tap, geo.rhs_dilation))
        limits = tuple(st + (o - 1) * s + 1 for st, o, s in zip(starts, out, geo.window_strides))
        yield starts, limits


def _patches(geo: ConvGeometry, x, *, transposed: bool = False):
    """int8 X (lhs layout) -> P [N * prod(out), prod(kernel) * C]: row (n, out position) holds
    the input window its output reads, taps row-major, channels last. transposed: P^T
    [prod(kernel) * C, N * prod(out)] built as such from X channels first, G_W's operand
    K-major, with no copy of P transposed (on 2 cores, batch 32, 56x56 64->64 3x3, G_W took
    59 ms this way against 268 with P transposed in the product)."""
    dn = geo.dimension_numbers.lhs_spec
    order = (dn[1], dn[0], *dn[2:]) if transposed else _lhs_order(dn)
    x = jnp.transpose(x, order)
    first = 2 if transposed else 1  # the first spatial axis
    edge = ((0, 0, 0),) * first
    pads = tuple((lo, hi, 0) for lo, hi in geo.padding)
    padded = lax.pad(x, jnp.zeros((), x.dtype), edge + pads + ((0, 0, 0),) * (2 - first))
    outer, inner = x.shape[:first], () if transposed else x.shape[-1:]  # around the spatial axes
    taps = [
        lax.slice(
            padded,
            (0,) * first + starts + (0,) * len(inner),
            outer + limits + inner,
            (1,) * first + geo.window_strides + (1,) * len(inner),
        )
        for starts, limits in _tap_windows(geo)
    ]
    if transposed:  # [taps, C, N, *out]
        return jnp.stack(taps, axis=0).reshape(len(taps) * x.shape[0], -1)
    return jnp.stack(taps, axis=-2).reshape(-1, len(taps) * x.shape[-1])


def _col2im(geo: ConvGeometry, cols, x_channels_last_shape):
    """The adjoint of _patches on int32: cols [N * prod(out), prod(kernel) * C] -> G_X
    [N, *in, C], each tap's block added at the input positions that tap read (a strided
    placement by interior padding, so XLA fuses the sum into one pass)."""
    n, *in_sizes, c = x_channels_last_shape
    out = _im2col_out_sizes(geo)
    windows = list(_tap_windows(geo))
    cols = cols.reshape(n, *out, len(windows), c)
    padded_sizes = [i + lo + hi for i, (lo, hi) in zip(in_sizes, geo.padding)]
    edge = ((0, 0, 0),)
    zero = jnp.zeros((), cols.dtype)
    total = None
    for tap, (starts, limits) in enumerate(windows):
        config = (
            edge
            + tuple(
                (st, size - lim, s - 1)
                for st, lim, size, s in zip(starts, limits, padded_sizes, geo.window_strides)
            )
            + edge
        )
        placed = lax.pad(cols[..., tap, :], zero, config)
        total = placed if total is None else total + placed
    # Negative padding crops the padded border off again (and pads where padding was negative).
    return lax.pad(total, zero, edge + tuple((-lo, -hi, 0) for lo, hi in geo.padding) + edge)


def _check_im2col(geo: ConvGeometry, *operands):
    if not im2col_applies(geo):
        raise ValueError(
            f"the im2col lowering needs feature_group_count=1, no lhs_dilation and a non-empty "
            f"output; got feature_group_count={geo.feature_group_count}, "
            f"lhs_dilation={geo.lhs_dilation}"
        )
    for a in operands:
        if a.dtype != jnp.int8:
            raise ValueError(f"the im2col lowering takes int8 operands, got {a.dtype}")


def _weight_matrix(geo: ConvGeometry, w):
    """int8 W (rhs layout) -> [prod(kernel) * C_in, C_out], rows in the patches' order."""
    w = jnp.transpose(w, _rhs_order(geo.dimension_numbers.rhs_spec))
    return w.reshape(-1, w.shape[-1])


def _out_matrix(geo: ConvGeometry, g, *, transposed: bool = False):
    """G_Y (out layout) -> [N * prod(out), C_out], rows in the patches' order (transposed: its
    transpose [C_out, N * prod(out)], built channels first)."""
    dn = geo.dimension_numbers.out_spec
    if transposed:
        return jnp.transpose(g, (dn[1], dn[0], *dn[2:])).reshape(g.shape[dn[1]], -1)
    g = jnp.transpose(g, _lhs_order(dn))
    return g.reshape(-1, g.shape[-1])


def conv_forward_im2col(geo: ConvGeometry, x, w, **dot_options):
    """Y = conv(X, W) as P @ W: int8 X (lhs layout), W (rhs layout) -> int32 (out layout).
    dot_options go to int8_dot (use_kernel, interpret)."""
    _check_im2col(geo, x, w)
    return _patches_times_weights(geo, x, w, **dot_options)


def _patches_times_weights(geo: ConvGeometry, x, w, **dot_options):
    """The forward GEMM P @ W of an im2col-able geometry, int32 in the out layout."""
    y = int8_dot(_patches(geo, x), _weight_matrix(geo, w), **dot_options)
    n, o = geo.lhs_shape[geo.dimension_numbers.lhs_spec[0]], geo.num_out_channels
    y = y.reshape(n, *_im2col_out_sizes(geo), o)
    return _from_order(y, _lhs_order(geo.dimension_numbers.out_spec))


def _grad_lhs_geometry(geo: ConvGeometry, out_shape, kernel_shape) -> ConvGeometry:
    """G_X's conv of a stride-1 conv as a forward conv: G_Y (out layout) is its input, the
    flipped kernel [O, I, *spatial] (O its input features, I its output ones) its kernel, the
    original lhs layout its output; stride 1, the original kernel dilation."""
    dn = geo.dimension_numbers
    n_sp = len(geo.window_strides)
    return ConvGeometry(
        lhs_shape=tuple(out_shape),
        rhs_shape=tuple(kernel_shape),
        window_strides=(1,) * n_sp,
        padding=_grad_lhs_padding(geo, out_shape),
        lhs_dilation=(1,) * n_sp,
        rhs_dilation=geo.rhs_dilation,
        dimension_numbers=lax.ConvDimensionNumbers(
            dn.out_spec, (1, 0, *range(2, n_sp + 2)), dn.lhs_spec
        ),
        feature_group_count=1,
    )


def conv_grad_lhs_im2col(geo: ConvGeometry, g, w, **dot_options):
    """G_X: int8 G_Y (out layout), W (rhs layout) -> int32 (lhs layout), as one GEMM.

    Stride 1: G_X is itself a forward conv of G_Y with the flipped kernel (no input dilation),
    so it runs as that conv's im2col, P(G_Y) [M_in, taps * C_out] @ W' [taps * C_out, C_in]:
    int8 patches in, G_X out. Strided: col2im(G_Y @ W^T), as the strided conv's G_X would
    otherwise dilate G_Y with zeros (stride^2 times the work). For a 3x3 conv the first writes
    9x G_Y's bytes in int8 where col2im writes and reads an int32 [M, 9 C_in] product, and its
    GEMM has K = 9 C_out, not C_out (ResNet-50's first stage on an H200, run 3: M=802816 K=576
    N=64 at 303 TOPS, against 107 for the K=64 N=576 GEMM of col2im)."""
    _check_im2col(geo, g, w)
    if all(s == 1 for s in geo.window_strides):
        kernel = _flipped_kernel(geo, w)
        trans = _grad_lhs_geometry(geo, g.shape, kernel.shape)
        return _patches_times_weights(trans, g, kernel, **dot_options)
    cols = int8_dot(_out_matrix(geo, g), _weight_matrix(geo, w), transpose_b=True, **dot_options)
    lhs_spec = geo.dimension_numbers.lhs_spec
    x_shape = tuple(geo.lhs_shape[a] for a in _lhs_order(lhs_spec))
    return _from_order(_col2im(geo, cols, x_shape), _lhs_order(lhs_spec))


def conv_grad_rhs_im2col(geo: ConvGeometry, x, g, **dot_options):
    """G_W = P^T @ G_Y: int8 X (lhs layout), G_Y (out layout) -> int32 (rhs layout)."""
    _check_im2col(geo, x, g)
    # Both operands K-major (the "NT" GEMM that int8 wgmma reads natively): P^T and G_Y^T.
    p_t, g_t = _patches(geo, x, transposed=True), _out_matrix(geo, g, transposed=True)
    g_w = int8_dot(p_t, g_t, transpose_b=True, **dot_options)
    rhs_spec = geo.dimension_numbers.rhs_spec
    g_w = g_w.reshape(tuple(geo.rhs_shape[a] for a in _rhs_order(rhs_spec)))
    return _from_order(g_w, _rhs_order(rhs_spec))


@dataclasses.dataclass(frozen=True)
class ConvProducts:
    """The three products of Y = conv(X, W) for the shared INT8 op (alijax/quant/_op.py).
    lowering: "im2col" runs the int8 products as GEMMs where im2col_applies, "auto" some of
    them (_lowering_of); float products (telemetry's reference) and other convs keep the conv
    lowering."""

    geometry: ConvGeometry
    gpu_operands: str = "float32"  # Recipe.gpu_conv_operands
    lowering: str = "auto"  # Recipe.conv_lowering

    @property
    def out_channel_axis(self) -> int:
        return self.geometry.out_channel_axis

    @property
    def rhs_channel_axis(self) -> int:
        return self.geometry.rhs_channel_axis

    def _as_gemm(self, product: str, a, b) -> bool:
        int8 = a.dtype == jnp.int8 and b.dtype == jnp.int8
        as_gemm = _lowering_of(self.lowering, product, self.geometry) == "im2col"
        return as_gemm and int8 and im2col_applies(self.geometry)

    def forward(self, x, w, out_dtype):
        if self._as_gemm("forward", x, w):
            return conv_forward_im2col(self.geometry, x, w)
        return conv_forward(self.geometry, x, w, out_dtype, self.gpu_operands)

    def grad_lhs(self, g, w, out_dtype):
        if self._as_gemm("grad_lhs", g, w):
            return conv_grad_lhs_im2col(self.geometry, g, w)
        return conv_grad_lhs(self.geometry, g, w, out_dtype, self.gpu_operands)

    def grad_rhs(self, x, g, out_dtype):
        if self._as_gemm("grad_rhs", x, g):
            return conv_grad_rhs_im2col(self.geometry, x, g)
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
    products = ConvProducts(geo, recipe.gpu_conv_operands, recipe.conv_lowering)
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
