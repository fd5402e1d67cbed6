"""MCS (solve, objective, tracking) and the Unified INT8 baseline."""

import jax.numpy as jnp
import numpy as np
import pytest

from alijax.quant import clipping, gvq, scale_updates

ALPHA = 2.0


def _approx_objective(g, s, alpha):
    """float64 numpy I1 + I2 (the paper's approximation) on samples g for clip s."""
    a = np.abs(g).astype(np.float64)
    f = np.exp(alpha * a / a.max())
    inside = a <= s
    return np.sum((s / 254) * f[inside]) + np.sum((a[~inside] - s) * f[~inside])


def _heavy_and_gaussian(n=16_384, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.laplace(size=n), rng.standard_t(3, size=n), rng.normal(size=n)], 1).astype(
        np.float32
    )


def test_mcs_objective_by_hand():
    g = jnp.array([1.0, -0.5])
    # s = 1: codes 127, -64 (-63.5 half to even); errors 0 and |-0.5 + 64/127|; f = e^(2 * 0.5).
    want = 0.5 * (abs(-0.5 + 64 / 127) * np.exp(1.0))
    assert float(clipping.mcs_objective(g, jnp.float32(1.0), alpha=ALPHA)) == pytest.approx(
        want, rel=1e-5
    )
    # Clipping at 0.5: the 1.0 loses 0.5 at weight e^2; -0.5 is exact.
    want = 0.5 * (0.5 * np.exp(2.0))
    assert float(clipping.mcs_objective(g, jnp.float32(0.5), alpha=ALPHA)) == pytest.approx(
        want, rel=1e-5
    )


def test_mcs_solve_is_the_argmin_over_its_candidates():
    g = _heavy_and_gaussian(4096)
    bins = 64
    got = np.asarray(clipping.mcs_solve(g, axis=1, alpha=ALPHA, num_bins=bins))
    for c in range(g.shape[1]):
        m = np.abs(g[:, c]).max()
        objective = [_approx_objective(g[:, c], j / bins * m, ALPHA) for j in range(1, bins + 1)]
        # The histogram gives the objective exactly at the bin edges (the candidates).
        assert _approx_objective(g[:, c], got[c], ALPHA) <= min(objective) * (1 + 1e-6)


def test_mcs_clips_heavy_tails_and_leaves_gaussian_channels_alone():
    g = _heavy_and_gaussian()
    amax = np.abs(g).max(axis=0)
    solved = np.asarray(clipping.mcs_solve(g, axis=1, alpha=ALPHA))
    assert solved[0] < 0.9 * amax[0] and solved[1] < 0.9 * amax[1]  # Laplace, t(3)
    gaussian = np.asarray(gvq.classify_channels(g, axis=1))
    np.testing.assert_array_equal(gaussian, [False, False, True])
    scale, state = clipping.mcs_scales(
        g, jnp.zeros(3), axis=1, is_gaussian=gaussian, alpha=ALPHA, k=1.0, a=0.8
    )
    np.testing.assert_allclose(scale, [solved[0], solved[1], amax[2]], rtol=1e-6)  # no clip
    np.testing.assert_allclose(state, scale)
    # The clipped scales lower the magnitude-weighted error of the heavy channels.
    for c in (0, 1):
        ours = clipping.mcs_objective(g[:, c], scale[c], alpha=ALPHA)
        assert float(ours) < float(clipping.mcs_objective(g[:, c], amax[c], alpha=ALPHA))


def test_mcs_tracking_recursion():
    prev = jnp.array([0.0, 2.0, 4.0])
    target = jnp.array([1.0, 1.0, 1.0])
    # Uninitialised (0) takes the target; else s_t = (1 - kA) s_{t-1} + A target.
    np.testing.assert_allclose(
        clipping.mcs_track(prev, target, k=1.0, a=0.8), [1.0, 0.2 * 2 + 0.8, 0.2 * 4 + 0.8]
    )
    np.testing.assert_allclose(
        clipping.mcs_track(prev, target, k=2.0, a=0.25), [1.0, 0.5 * 2 + 0.25, 0.5 * 4 + 0.25]
    )


def test_literal_paper_target_tracks_the_max():
    g = _heavy_and_gaussian()
    amax = np.abs(g).max(axis=0)
    prev = jnp.asarray(amax * 2.0)
    scale, state = clipping.mcs_scales(
        g, prev, axis=1, is_gaussian=jnp.zeros(3, bool), alpha=ALPHA, k=1.0, a=0.8, target="max"
    )
    # The state follows the recursion; the clip used never exceeds max|g|.
    np.testing.assert_allclose(state, 0.2 * 2.0 * amax + 0.8 * amax, rtol=1e-6)
    np.testing.assert_allclose(scale, amax, rtol=1e-6)


def test_clip_is_kept_only_where_it_lowers_the_exact_objective():
    g = jnp.asarray(_heavy_and_gaussian())
    amax = jnp.max(jnp.abs(g), axis=0)
    # A stale state far below the current gradient would clip almost everything: refused.
    tiny = 1e-3 * amax
    scale, _ = clipping.mcs_scales(
        g, tiny, axis=1, is_gaussian=jnp.zeros(3, bool), alpha=ALPHA, k=1.0, a=0.01
    )
    np.testing.assert_allclose(scale, amax, rtol=1e-6)
    # Whatever the state, the objective of the scales used is at most that of max|g| per channel.
    for prev in (tiny, 0.3 * amax, amax):
        scale, _ = clipping.mcs_scales(
            g, prev, axis=1, is_gaussian=jnp.zeros(3, bool), alpha=ALPHA, k=1.0, a=0.8
        )
        for c in range(3):
            used = clipping.mcs_objective(g[:, c], scale[c], alpha=ALPHA)
            unclipped = clipping.mcs_objective(g[:, c], amax[c], alpha=ALPHA)
            assert float(used) <= float(unclipped) * (1 + 1e-6)


def test_non_finite_channel_gets_nan_scale_and_keeps_its_state():
    g = _heavy_and_gaussian(512)
    g[3, 1] = np.nan
    prev = jnp.array([0.5, 0.7, 0.9])
    scale, state = clipping.mcs_scales(
        g, prev, axis=1, is_gaussian=jnp.array([False, False, True]), alpha=ALPHA, k=1.0, a=0.8
    )
    assert np.isnan(scale[1]) and np.all(np.isfinite(np.asarray(scale)[[0, 2]]))
    assert float(state[1]) == pytest.approx(0.7)


def test_unified_clip_and_lr_scale():
    g = jnp.asarray(_heavy_and_gaussian()[:, 1])
    clip, d_c = clipping.unified_clip(g, num_candidates=16, min_ratio=0.3)
    amax = float(jnp.max(jnp.abs(g)))
    assert 0.3 * amax - 1e-6 <= float(clip) <= amax
    from alijax.quant import numerics

    at_max = 1.0 - float(clipping.cosine(g, numerics.fake_quant(g, jnp.float32(amax))))
    assert 0.0 <= float(d_c) <= at_max + 1e-7  # the search includes the max-abs candidate
    assert float(clipping.unified_lr_scale(jnp.float32(0.0))) == 1.0
    assert float(clipping.unified_lr_scale(jnp.float32(0.05))) == pytest.approx(np.exp(-1.0))
    assert float(clipping.unified_lr_scale(jnp.float32(0.5))) == pytest.approx(0.1)


def test_scale_updates_multiplies_the_owning_layers_kernel():
    updates = {
        "conv": {"kernel": jnp.ones((2, 2))},
        "head": {"kernel": jnp.ones(3), "bias": jnp.ones(3)},
    }
    quant_state = {"conv": {"QuantConv_0": {"telemetry": {"lr_scale": jnp.float32(0.25)}}}}
    out = scale_updates(updates, quant_state)
    np.testing.assert_array_equal(out["conv"]["kernel"], 0.25 * np.ones((2, 2)))
    np.testing.assert_array_equal(out["head"]["kernel"], np.ones(3))


def test_bad_arguments_name_themselves():
    g = jnp.ones((8, 2))
    with pytest.raises(ValueError, match="num_bins"):
        clipping.mcs_solve(g, axis=1, num_bins=1)
    with pytest.raises(ValueError, match="target"):
        clipping.mcs_scales(
            g,
            jnp.zeros(2),
            axis=1,
            is_gaussian=jnp.ones(2, bool),
            alpha=1.0,
            k=1.0,
            a=0.8,
            target="x",
        )
    with pytest.raises(ValueError, match="scale.shape"):
        clipping.mcs_objective(g, jnp.ones(3), axis=1)
    with pytest.raises(ValueError, match="min_ratio"):
        clipping.unified_clip(g, min_ratio=0.0)
