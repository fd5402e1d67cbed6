"""Gradient Vectorized Quantization (Zhao et al., AAAI 2021, arXiv 2102.04782).

The output gradient G_Y used for the weight gradient G_W = X^T G_Y is quantized with one scale per
output channel. The scale of channel n multiplies column n of G_Y and the sum of G_W[:, n] runs
over rows (N*H*W for a conv) only, so it factors out of the integer GEMM: G_W[:, n] =
(s_x / 127)(s_n / 127) * sum_m q_x[m, :] q_g[m, n]. The cost is one scale vector, not a slower GEMM.

Channels are classed by the shape of their gradient distribution, Eq. (2):
Gaussian-like when P(|g| > sigma) > lambda, else "inverted-T" (sharp peak, long tail), lambda = 0.3.
(For reference: a Gaussian has P(|g| > sigma) = 0.317, a Laplace exp(-sqrt 2) = 0.243.)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from alijax.quant import clipping, numerics

CLIPPINGS = ("maxabs", "mcs", "unified")


def exceed_sigma_fraction(g: jax.Array, axis: int | None = None) -> jax.Array:
    """P(|g| > sigma) per channel along `axis` ([C]) or for the tensor ([]), sigma = channel std."""
    g2 = clipping.as_rows(g, axis)
    sigma = jnp.std(g2, axis=0)
    frac = jnp.mean(jnp.abs(g2) > sigma[None, :], axis=0)
    return frac[0] if axis is None else frac


def classify_channels(g: jax.Array, axis: int | None = None, lam: float = 0.3) -> jax.Array:
    """True where the channel is Gaussian-like (Eq. 2: P(|g| > sigma) > lam), False if inverted-T.

    An all-zero channel has P = 0 and counts as inverted-T (its clip is 0 either way).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"{lam=} must be in [0, 1]")
    return exceed_sigma_fraction(g, axis) > lam


class GradientQuant(NamedTuple):
    """A quantized gradient. scale is [C] (C = 1 per tensor); state is the new clip state [C]."""

    q: jax.Array  # int8, the shape of g
    scale: jax.Array  # float32 [C]
    state: jax.Array  # float32 [C]
    inverted_t: jax.Array  # float32 [], number of inverted-T channels
    d_c: jax.Array  # float32 [], cosine distance of the chosen clip (unified only, else 0)


def quantize_gradient(
    g: jax.Array,
    *,
    axis: int | None,
    clipping_mode: str,
    prev: jax.Array,
    recipe,
    key: jax.Array | None = None,
) -> GradientQuant:
    """Quantizes an output gradient per channel along `axis` (or per tensor when None).

    g: float [...]; prev: [C] clip state from the last step (MCS tracking; ignored otherwise);
    recipe: an alijax.quant.Recipe (mcs_* / unified_* constants, gradient rounding).
    """
    if clipping_mode not in CLIPPINGS:
        raise ValueError(f"clipping_mode={clipping_mode!r} must be one of {CLIPPINGS}")
    if clipping_mode == "unified" and axis is not None:
        raise ValueError("clipping_mode='unified' clips a whole tensor; pass axis=None")
    g = g.astype(jnp.float32)
    is_gaussian = jnp.atleast_1d(classify_channels(g, axis, recipe.mcs_lambda))
    inverted_t = jnp.sum(~is_gaussian).astype(jnp.float32)
    d_c = jnp.float32(0.0)
    if clipping_mode == "maxabs":
        scale = jnp.atleast_1d(numerics.maxabs(g, axis))
        state = jnp.where(jnp.isfinite(scale), scale, prev)
    elif clipping_mode == "mcs":
        scale, state = clipping.mcs_scales(
            g,
            prev,
            axis=axis,
            is_gaussian=is_gaussian,
            alpha=recipe.mcs_alpha,
            k=recipe.mcs_k,
            a=recipe.mcs_a,
            target=recipe.mcs_target,
            num_bins=recipe.mcs_bins,
        )
    else:
        clip, d_c = clipping.unified_clip(
            g, num_candidates=recipe.unified_candidates, min_ratio=recipe.unified_min_ratio
        )
        scale = jnp.atleast_1d(clip)
        state = jnp.where(jnp.isfinite(scale), scale, prev)
    q = numerics.quantize(
        g,
        scale[0] if axis is None else scale,
        axis=axis,
        rounding=recipe.rounding,
        key=key,
    )
    return GradientQuant(q, scale, state, inverted_t, d_c)
