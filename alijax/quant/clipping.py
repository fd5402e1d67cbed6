"""Clipping values for gradient quantization: MCS (DA-INT8) and the baselines.

Magnitude-aware Clipping Strategy (Zhao et al., AAAI 2021, arXiv 2102.04782). The clipping value
`s` of a channel minimises the magnitude-weighted quantization error, Eq. (3):

    E(s) = integral |g - g_hat| f(g) p(g) dg,      f(g) = exp(alpha |g|).

With a symmetric p and the paper's approximation |g - g_hat| ~ (1/2) s/127 inside (0, s), E splits
into a rounding term and a clipping term:

    E(s) = int_0^s (s/127) f p dg  +  2 int_s^max (g - s) f p dg          (I1 + I2)

The paper solves dE/ds = 0 in closed form under two distribution models: for a Gaussian channel
the optimum is s = max|g| (no clipping); for an inverted-T channel (sharp peak, long tail, modelled
as piecewise uniform) the solution becomes the recursion s_t = (1 - kA) s_{t-1} + A max|g|_t,
with k and A found by a grid search (k = 1, A = 0.8).

How this module solves it, and where it departs from the paper (said here once):

* Solve: a vectorised search over B candidate clips s_j = (j/B) max|g| (j = 1..B) of the I1 + I2
  objective evaluated on the channel's *empirical* distribution. One pass bins |g|/max|g| into B
  bins per channel accumulating sum f and sum |g| f; prefix sums then give E(s_j) for every
  candidate at once, exactly (for the approximate objective) at the bin edges. O(N C) work, O(B C)
  memory. We do not use the paper's closed form because it needs the parameters of the fitted
  piecewise-uniform model (its peak height and width), which the paper does not give a recipe
  for estimating; the empirical search needs no model and is exact for the data at hand.
* Tracking: the paper's recursion with its constants, but with the *solved* clip as the target
  (`target="solved"`, the default): s_t = (1 - kA) s_{t-1} + A s*_t. Its fixed point is s*/k.
  With the paper's k = 1 the literal recursion (target max|g|_t, `target="max"`) has the fixed point
  max|g|: it clips only when the max jumps above its running average, and alpha plays no part.
  Tracking the solved clip keeps the paper's smoothing and makes the magnitude-aware solve the
  thing that is tracked. `target="max"` reproduces the literal formula.
* Guard: the clip used is capped at max|g|, and a channel keeps it only where it lowers the exact
  Eq. (3) objective of the current gradient below not clipping. The I1 + I2 approximation charges
  every value inside the clip a rounding error of half a step, but values far below the step round
  to zero with their own (small) magnitude as error; on sharply peaked channels it therefore
  over-rates clipping, and the tracked clip also lags the gradient it is applied to. The state
  still follows the recursion, so tracking is unchanged.
* alpha: f(g) = exp(alpha |g| / max|g|), i.e. alpha acts on the channel's max-normalised magnitude.
  The raw exp(alpha |g|) depends on the units of the loss (gradients are ~1e-4 and scale with
  loss scaling and batch size), so the same alpha would mean nothing from one layer to the next.
  Normalised, e^alpha is the weight of the largest gradient relative to a zero one. We could not
  recover the paper's numeric alpha; the default (2.0) is ours.

Baselines: max-abs per tensor; Unified INT8 (Zhu et al., CVPR 2020): direction-sensitive gradient
clipping picks the clip that minimises the cosine distance d_c = 1 - cos(g, g_hat), and
deviation-counteractive learning-rate scaling multiplies the layer's learning rate by
phi = max(exp(-alpha d_c), beta), alpha = 20, beta = 0.1 (see `scale_updates` in overwrite.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alijax.quant import numerics

MCS_TARGETS = ("solved", "max")


# ----------------------------------------------------------------------------- layout helpers


def as_rows(g: jax.Array, axis: int | None) -> jax.Array:
    """g as float32 [N, C]: channels along `axis` become columns; per tensor gives C = 1."""
    g = g.astype(jnp.float32)
    if axis is None:
        return jnp.reshape(g, (-1, 1))
    if not -g.ndim <= axis < g.ndim:
        raise ValueError(f"{axis=} is out of range for {g.shape=}")
    return jnp.reshape(jnp.moveaxis(g, axis, -1), (-1, g.shape[axis]))


def _column_max(g2: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(g2), axis=0)


# ----------------------------------------------------------------------------- MCS


def magnitude_weight(g2: jax.Array, alpha: float) -> jax.Array:
    """f(g) = exp(alpha |g| / max|g|) per column of g2 [N, C] (see module docstring)."""
    amax = _column_max(g2)
    safe = jnp.where(amax > 0, amax, 1.0)
    return jnp.exp(alpha * jnp.abs(g2) / safe)


def mcs_objective(
    g: jax.Array, scale: jax.Array, *, axis: int | None = None, alpha: float = 2.0
) -> jax.Array:
    """The MCS objective, Eq. (3), measured exactly on the data: mean of |g - g_hat| f(g).

    g: float [...]; scale: [] (one clip for the whole tensor) or [g.shape[axis]] (per channel).
    f is normalised per channel along `axis` (per tensor when axis is None), so a per-channel and a
    per-tensor choice of scale are scored by the same function and can be compared. g_hat uses
    round-to-nearest (the objective is a property of the scales, not of one rounding draw).
    Returns a float32 scalar in the units of g.
    """
    g2 = as_rows(g, axis)
    scale = jnp.asarray(scale, jnp.float32)
    if scale.ndim == 0:
        scale = jnp.broadcast_to(scale, (g2.shape[1],))
    if scale.shape != (g2.shape[1],):
        raise ValueError(f"scale.shape={scale.shape} must be () or ({g2.shape[1]},) for {axis=}")
    g_hat = numerics.fake_quant(g2, scale, axis=1)
    return jnp.mean(jnp.abs(g2 - g_hat) * magnitude_weight(g2, alpha))


def mcs_solve(
    g: jax.Array, *, axis: int | None = None, alpha: float = 2.0, num_bins: int = 128
) -> jax.Array:
    """Clip value(s) minimising the I1 + I2 form of Eq. (3) on the empirical distribution.

    g: float [...]. Returns float32 [g.shape[axis]] (or [] per tensor): one of the candidates
    (j / num_bins) * max|g|, j = 1..num_bins; 0 for an all-zero channel. NaN/Inf channels give NaN.
    """
    if num_bins < 2:
        raise ValueError(f"{num_bins=} must be >= 2")
    g2 = as_rows(g, axis)
    clip = _mcs_solve_rows(g2, alpha, num_bins)
    return clip[0] if axis is None else clip


def _mcs_solve_rows(g2: jax.Array, alpha: float, num_bins: int) -> jax.Array:
    n, c = g2.shape
    amax = _column_max(g2)
    safe = jnp.where((amax > 0) & jnp.isfinite(amax), amax, 1.0)
    u = jnp.abs(g2) / safe  # in [0, 1]
    u = jnp.where(jnp.isfinite(u), u, 0.0)
    f = jnp.exp(alpha * u)
    bins = jnp.clip(jnp.floor(u * num_bins).astype(jnp.int32), 0, num_bins - 1)
    segment = bins * c + jnp.arange(c, dtype=jnp.int32)[None, :]
    # Per (bin, channel): sum of f and sum of u f. One scatter pass, no [N, C, B] intermediate.
    sums = jax.ops.segment_sum(
        jnp.stack([f.ravel(), (u * f).ravel()], axis=-1),
        segment.ravel(),
        num_segments=num_bins * c,
    ).reshape(num_bins, c, 2)
    f_in = jnp.cumsum(sums[..., 0], axis=0)  # [B, C]: sum f over |g| <= s_j, j = 1..B
    uf_in = jnp.cumsum(sums[..., 1], axis=0)
    f_out = f_in[-1] - f_in
    uf_out = uf_in[-1] - uf_in
    ratio = (jnp.arange(1, num_bins + 1, dtype=jnp.float32) / num_bins)[:, None]  # s_j / max
    # In units of max|g|, summed over both signs: I1 charges half a step (s / 254) to every value
    # inside the clip, I2 charges |g| - s to every clipped value.
    objective = ratio / (2 * numerics.QMAX) * f_in + (uf_out - ratio * f_out)
    best = jnp.argmin(objective, axis=0)
    clip = (best + 1).astype(jnp.float32) / num_bins * amax
    return numerics.poison_nonfinite(clip, amax)


def mcs_track(prev: jax.Array, target: jax.Array, *, k: float, a: float) -> jax.Array:
    """The paper's recursion s_t = (1 - kA) s_{t-1} + A target_t.

    prev [C] holds s_{t-1}; 0 marks an uninitialised channel, which takes the target itself (an
    average with an arbitrary start would under-scale the first steps).
    """
    tracked = (1.0 - k * a) * prev + a * target
    return jnp.where(prev > 0, tracked, target)


def mcs_scales(
    g: jax.Array,
    prev: jax.Array,
    *,
    axis: int | None,
    is_gaussian: jax.Array,
    alpha: float,
    k: float,
    a: float,
    target: str = "solved",
    num_bins: int = 128,
) -> tuple[jax.Array, jax.Array]:
    """Per-channel MCS clips and the new tracking state.

    g: float [...]; prev: [C] state s_{t-1} (C = g.shape[axis], or 1 per tensor);
    is_gaussian: bool [C] (gvq.classify_channels). Gaussian channels use s = max|g| (the paper's
    solution for them); inverted-T channels use the tracked clip. Returns (scale [C], state [C]);
    a channel whose gradient is not finite gets scale NaN and keeps its previous state.
    """
    if target not in MCS_TARGETS:
        raise ValueError(f"{target=} must be one of {MCS_TARGETS}")
    g2 = as_rows(g, axis)
    if prev.shape != (g2.shape[1],):
        raise ValueError(f"prev.shape={prev.shape} must be ({g2.shape[1]},)")
    amax = _column_max(g2)
    goal = _mcs_solve_rows(g2, alpha, num_bins) if target == "solved" else amax
    recursion = mcs_track(prev, goal, k=k, a=a)
    tracking = jnp.where(is_gaussian, amax, recursion)
    # A clip above max|g| only coarsens the step, so the clip used is capped there.
    tracked = jnp.minimum(recursion, amax)
    # Guard (ours): the solve scores rounding with the paper's uniform approximation and the
    # tracked clip lags the current gradient, so a channel keeps its clip only where that lowers
    # the exact Eq. (3) objective of this very gradient below not clipping (s = max|g|).
    clip_wins = _column_objective(g2, tracked, alpha) < _column_objective(g2, amax, alpha)
    scale = jnp.where(is_gaussian | ~clip_wins, amax, tracked)
    state = jnp.where(jnp.isfinite(amax), tracking, prev)
    return numerics.poison_nonfinite(scale, amax), state


def _column_objective(g2: jax.Array, scale: jax.Array, alpha: float) -> jax.Array:
    """Eq. (3) per column of g2 [N, C] for clips scale [C]: float32 [C]."""
    g_hat = numerics.fake_quant(g2, scale, axis=1)
    return jnp.mean(jnp.abs(g2 - g_hat) * magnitude_weight(g2, alpha), axis=0)


# ----------------------------------------------------------------------------- Unified INT8


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """cos(a, b) over all elements, float32; 1 when both are zero."""
    a = a.astype(jnp.float32).ravel()
    b = b.astype(jnp.float32).ravel()
    norm = jnp.linalg.norm(a) * jnp.linalg.norm(b)
    return jnp.where(norm > 0, jnp.dot(a, b) / jnp.where(norm > 0, norm, 1.0), 1.0)


def unified_clip(
    g: jax.Array, *, num_candidates: int = 16, min_ratio: float = 0.3
) -> tuple[jax.Array, jax.Array]:
    """Direction-sensitive gradient clipping (Zhu et al. 2020): one clip for the tensor.

    Searches clips r * max|g| for r in linspace(min_ratio, 1, num_candidates) and keeps the one
    whose fake-quantized gradient has the smallest cosine distance to g. Candidates are scored one
    at a time (lax.map) so memory stays at one copy of g. Returns (clip [], d_c []).
    """
    if num_candidates < 1:
        raise ValueError(f"{num_candidates=} must be >= 1")
    if not 0.0 < min_ratio <= 1.0:
        raise ValueError(f"{min_ratio=} must be in (0, 1]")
    g = g.astype(jnp.float32)
    amax = numerics.maxabs(g)
    ratios = jnp.linspace(min_ratio, 1.0, num_candidates, dtype=jnp.float32)
    cos = jax.lax.map(lambda r: cosine(g, numerics.fake_quant(g, r * amax)), ratios)
    best = jnp.argmax(jnp.where(jnp.isfinite(cos), cos, -jnp.inf))
    return ratios[best] * amax, 1.0 - cos[best]


def unified_lr_scale(d_c: jax.Array, *, alpha: float = 20.0, beta: float = 0.1) -> jax.Array:
    """Deviation-counteractive learning-rate scaling phi = max(exp(-alpha d_c), beta)."""
    return jnp.maximum(jnp.exp(-alpha * d_c), beta)
