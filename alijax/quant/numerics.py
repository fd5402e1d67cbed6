"""Symmetric INT8 numerics: scales, quantize, dequantize, round-to-nearest and stochastic rounding.

The quantizer is Eq. (1) of Zhao et al. (AAAI 2021, arXiv 2102.04782):

    q = round(127 * clamp(x, s) / s),      x_hat = q * s / 127,

with one clipping value `s` per tensor, or one per channel along an axis. Codes lie in
[-127, 127] (the code -128 is never used, so the grid is symmetric).

Non-finite values are never turned into finite ones. The int8 code of a NaN or Inf is
meaningless, so the scale carries the poison: a group (tensor or channel) holding a NaN or Inf
gets the scale NaN, `dequantize` returns NaN where the scale is not finite, and any integer
product rescaled by that scale is NaN. `optax.apply_if_finite` and dynamic loss scaling then see it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

QMAX = 127  # largest int8 code used: the grid is {-127, ..., 127}
ROUNDINGS = ("nearest", "stochastic")


def _channel_axis(ndim: int, axis: int | None) -> int | None:
    if axis is None:
        return None
    if not -ndim <= axis < ndim:
        raise ValueError(f"{axis=} is out of range for an array with {ndim=}")
    return axis % ndim


def _reduce_axes(ndim: int, axis: int | None) -> tuple[int, ...]:
    """All axes but the channel axis (all axes when per tensor)."""
    return tuple(a for a in range(ndim) if a != axis)


def _broadcast_scale(scale: jax.Array, ndim: int, axis: int | None) -> jax.Array:
    """A per-tensor scale [] or per-channel scale [C] shaped to broadcast against x."""
    if axis is None:
        return scale
    shape = [1] * ndim
    shape[axis] = -1
    return jnp.reshape(scale, shape)


def poison_nonfinite(scale: jax.Array, amax: jax.Array) -> jax.Array:
    """`scale` where the group's max |x| is finite, NaN where it is not (see module docstring)."""
    return jnp.where(jnp.isfinite(amax), scale, jnp.nan).astype(jnp.float32)


def _check_real(x) -> None:
    # (a complex x lost its imaginary part in the float32 cast, with only a warning)
    if jnp.issubdtype(jnp.result_type(x), jnp.complexfloating):
        raise ValueError(f"x.dtype={jnp.result_type(x)} must be real (int or float)")


def _lift(s: jax.Array) -> jax.Array:
    """2^64 where s < 2^-64, else 1: a power of two (exact) that keeps 127 / s and s / 127 of a
    tiny scale in float32's normal range. Unlifted, 127 / s is inf below s = 3.7e-37 (every
    nonzero code became +-127) and s / 127 subnormal below 1.5e-36, which XLA flushes to 0
    (x_hat = 0). (Dividing instead does not help: XLA:CPU divides by multiplying with the
    reciprocal, and 1 / s is flushed to 0 above s = 8.5e37.)"""
    return jnp.where(s < 2.0**-64, jnp.float32(2.0**64), jnp.float32(1.0))


def maxabs(x: jax.Array, axis: int | None = None) -> jax.Array:
    """max |x| per tensor ([]) or per channel along `axis` ([x.shape[axis]]), float32.

    NaN or Inf anywhere in a group makes that group's value NaN.
    """
    _check_real(x)
    axis = _channel_axis(x.ndim, axis)
    # initial: an empty group's max |x| is 0 (its zero scale gives zero codes), not an error.
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=_reduce_axes(x.ndim, axis), initial=0.0)
    return poison_nonfinite(amax, amax)


def quantize(
    x: jax.Array,
    scale: jax.Array,
    *,
    axis: int | None = None,
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> jax.Array:
    """int8 codes of x for clipping value(s) `scale` (Eq. 1).

    x: float [...]; scale: float [] (per tensor, axis=None) or [x.shape[axis]] (per channel).
    rounding: "nearest" (half to even) or "stochastic" (floor(y + u), u ~ U[0, 1), unbiased;
    needs `key`). A zero scale gives zero codes; non-finite x or scale gives code 0 (the scale
    carries the NaN, see the module docstring).
    """
    _check_real(x)
    if rounding not in ROUNDINGS:
        raise ValueError(f"{rounding=} must be one of {ROUNDINGS}")
    if rounding == "stochastic" and key is None:
        raise ValueError("rounding='stochastic' needs a PRNG `key`")
    axis = _channel_axis(x.ndim, axis)
    scale = jnp.asarray(scale, jnp.float32)
    expected = () if axis is None else (x.shape[axis],)
    if scale.shape != expected:
        raise ValueError(f"scale.shape={scale.shape} must be {expected} for {axis=}, {x.shape=}")
    s = _broadcast_scale(scale, x.ndim, axis)
    x = x.astype(jnp.float32)
    usable = (s > 0) & jnp.isfinite(s)
    safe_s = jnp.where(usable, s, 1.0)
    lift = _lift(safe_s)  # 1 for any usual scale: the same bits as clip(x) * (127 / s)
    y = (jnp.clip(x, -safe_s, safe_s) * lift) * (QMAX / (safe_s * lift))
    if rounding == "nearest":
        q = jnp.round(y)
    else:
        q = jnp.floor(y + jax.random.uniform(key, y.shape, jnp.float32))
    # floor(127 + u) with u < 1 is 127, so clipping keeps codes in range; the clip is for safety
    # against a float y that rounds just above 127 after the scale multiplication.
    q = jnp.clip(q, -QMAX, QMAX)
    q = jnp.where(usable & jnp.isfinite(x), q, 0.0)
    return q.astype(jnp.int8)


def dequantize(q: jax.Array, scale: jax.Array, *, axis: int | None = None) -> jax.Array:
    """x_hat = q * s / 127, float32; NaN wherever the scale is not finite."""
    axis = _channel_axis(q.ndim, axis)
    s = _broadcast_scale(jnp.asarray(scale, jnp.float32), q.ndim, axis)
    lift = _lift(s)  # 1 for any usual scale: the same bits as q * (s / 127)
    x_hat = q.astype(jnp.float32) * (s * lift / QMAX) / lift
    return jnp.where(jnp.isfinite(s), x_hat, jnp.nan)


def quantize_maxabs(
    x: jax.Array,
    *,
    axis: int | None = None,
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Unclipped quantization (s = max |x| per tensor or channel). Returns (int8 codes, scale)."""
    scale = maxabs(x, axis)
    return quantize(x, scale, axis=axis, rounding=rounding, key=key), scale


def fake_quant(
    x: jax.Array,
    scale: jax.Array,
    *,
    axis: int | None = None,
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> jax.Array:
    """dequantize(quantize(x)): the float value the INT8 path represents x by."""
    q = quantize(x, scale, axis=axis, rounding=rounding, key=key)
    return dequantize(q, scale, axis=axis)


def code_factor(*scales: jax.Array) -> jax.Array:
    """prod(s_i / 127): the factor that turns an int32 product of codes into real units.

    NaN when any scale is not finite, so a poisoned operand poisons the whole product (even
    where the integer accumulator is 0).
    """
    factor = jnp.float32(1.0)
    for s in scales:
        s = jnp.asarray(s, jnp.float32)
        factor = factor * jnp.where(jnp.isfinite(s), s / QMAX, jnp.nan)
    return factor
