"""Channel classification (Eq. 2) and per-channel gradient quantization."""

import jax.numpy as jnp
import numpy as np
import pytest

from alijax.quant import da_int8, gvq, per_tensor_int8


def test_exceed_sigma_fraction_by_hand():
    # Column 0: +-1, std 1, nothing strictly beyond it. Column 1: [0, 0, 0, 4], mean 1,
    # std sqrt(3) = 1.73, one value beyond it.
    g = jnp.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 4.0]])
    np.testing.assert_allclose(gvq.exceed_sigma_fraction(g, axis=1), [0.0, 0.25])
    # Whole tensor: mean 0.5, std 1.5, only the 4 lies beyond it.
    assert float(gvq.exceed_sigma_fraction(g)) == pytest.approx(1 / 8)


def test_classification_separates_gaussian_from_heavy_tails():
    rng = np.random.default_rng(0)
    n = 20_000
    g = np.stack(
        [
            rng.normal(size=n),
            rng.laplace(size=n),
            rng.standard_t(3, size=n),
            1e-3 * rng.normal(size=n),
        ],
        axis=1,
    ).astype(np.float32)
    # P(|g| > sigma): Gaussian 0.317, Laplace 0.243, t(3) ~0.19; lambda = 0.3 splits them.
    np.testing.assert_array_equal(gvq.classify_channels(g, axis=1), [True, False, False, True])
    # The channel axis can be anywhere.
    np.testing.assert_array_equal(
        gvq.classify_channels(g.T.reshape(4, 100, 200), axis=0), [True, False, False, True]
    )


def test_per_channel_gradient_scales_and_codes_by_hand():
    g = jnp.array([[0.5, -0.25], [-2.0, 0.125], [1.0, 0.0]])
    out = gvq.quantize_gradient(
        g, axis=1, clipping_mode="maxabs", prev=jnp.zeros((2,)), recipe=da_int8(mcs=False)
    )
    np.testing.assert_array_equal(out.scale, [2.0, 0.25])
    # 127 g / s: column 0 [31.75, -127, 63.5], column 1 [-127, 63.5, 0].
    np.testing.assert_array_equal(out.q, [[32, -127], [-127, 64], [64, 0]])
    np.testing.assert_array_equal(out.state, [2.0, 0.25])
    tensor = gvq.quantize_gradient(
        g, axis=None, clipping_mode="maxabs", prev=jnp.zeros((1,)), recipe=per_tensor_int8()
    )
    np.testing.assert_array_equal(tensor.scale, [2.0])
    np.testing.assert_array_equal(tensor.q[:, 1], [-16, 8, 0])  # -15.875, 7.9375, 0


def test_bad_arguments_name_themselves():
    g = jnp.ones((4, 2))
    with pytest.raises(ValueError, match="clipping_mode"):
        gvq.quantize_gradient(g, axis=1, clipping_mode="max", prev=jnp.zeros(2), recipe=da_int8())
    with pytest.raises(ValueError, match="axis=None"):
        gvq.quantize_gradient(
            g, axis=1, clipping_mode="unified", prev=jnp.zeros(2), recipe=da_int8()
        )
    with pytest.raises(ValueError, match="lam"):
        gvq.classify_channels(g, axis=1, lam=1.5)
