"""Symmetric INT8 quantize / dequantize, rounding, and the non-finite policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alijax.quant import numerics


def test_per_tensor_codes_by_hand():
    x = jnp.array([2.0, -1.0, 0.5, 0.0, -2.0])
    q, s = numerics.quantize_maxabs(x)
    # s = 2: 127 * x / 2 = [127, -63.5, 31.75, 0, -127]; -63.5 rounds half to even -> -64.
    assert float(s) == 2.0
    np.testing.assert_array_equal(q, [127, -64, 32, 0, -127])
    assert q.dtype == jnp.int8
    np.testing.assert_allclose(
        numerics.dequantize(q, s), np.array([127, -64, 32, 0, -127]) * 2 / 127, rtol=1e-7
    )


def test_per_channel_scales_by_hand_along_either_axis():
    # `axis` names the channel axis: each index along it gets its own scale.
    x = jnp.array([[1.0, -4.0, 0.5], [-2.0, 1.0, 0.25]])
    np.testing.assert_array_equal(numerics.maxabs(x, axis=1), [2.0, 4.0, 0.5])
    np.testing.assert_array_equal(numerics.maxabs(x, axis=-1), [2.0, 4.0, 0.5])
    np.testing.assert_array_equal(numerics.maxabs(x, axis=0), [4.0, 2.0])
    q, s = numerics.quantize_maxabs(x, axis=1)
    # column scales 2, 4, 0.5: 127 x / s = [[63.5, -127, 127], [-127, 31.75, 63.5]].
    np.testing.assert_array_equal(q, [[64, -127, 127], [-127, 32, 64]])
    q0, s0 = numerics.quantize_maxabs(x, axis=0)
    # row scales 4, 2: [[31.75, -127, 15.875], [-127, 63.5, 15.875]].
    np.testing.assert_array_equal(q0, [[32, -127, 16], [-127, 64, 16]])
    np.testing.assert_allclose(
        numerics.dequantize(q0, s0, axis=0), np.asarray(q0) * np.array([[4.0], [2.0]]) / 127
    )


def test_clip_below_max_saturates_and_zero_scale_gives_zeros():
    x = jnp.array([3.0, -3.0, 0.5])
    np.testing.assert_array_equal(numerics.quantize(x, jnp.float32(1.0)), [127, -127, 64])
    np.testing.assert_array_equal(numerics.quantize(x, jnp.float32(0.0)), [0, 0, 0])
    q, s = numerics.quantize_maxabs(jnp.zeros((3,)))
    np.testing.assert_array_equal(numerics.dequantize(q, s), [0.0, 0.0, 0.0])


def test_tiny_scales_keep_their_codes_and_values():
    # A normal float32 scale below 127 / FLT_MAX = 3.7e-37 made the factor 127 / s infinite
    # (every nonzero code +-127), and below 1.5e-36, s / 127 was flushed to 0 (x_hat = 0).
    x = jnp.array([1e-37, 5e-38, -1e-37 / 3, 0.0], jnp.float32)
    q, s = numerics.quantize_maxabs(x)
    np.testing.assert_array_equal(q, [127, 64, -42, 0])
    np.testing.assert_array_equal(q, numerics.quantize_maxabs(x * 1e30)[0])
    np.testing.assert_allclose(numerics.dequantize(q, s), np.asarray(q) * 1e-37 / 127, rtol=1e-6)
    # And a scale near float32's top: 127 x overflows, x / s does not.
    big = jnp.array([3e38, -1.5e38], jnp.float32)
    np.testing.assert_array_equal(numerics.quantize_maxabs(big)[0], [127, -64])


def test_empty_groups_have_zero_scale():
    np.testing.assert_array_equal(numerics.maxabs(jnp.zeros((0, 3)), axis=1), [0.0, 0.0, 0.0])
    assert float(numerics.maxabs(jnp.zeros((5, 0)))) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_never_becomes_finite(bad):
    x = jnp.array([[1.0, 2.0], [bad, 0.5], [0.1, 0.2]])
    q, s = numerics.quantize_maxabs(x)
    assert np.all(np.isnan(numerics.dequantize(q, s)))
    assert np.isnan(float(numerics.code_factor(s, jnp.float32(1.0))))
    # Per channel: only the poisoned channel goes NaN.
    qc, sc = numerics.quantize_maxabs(x, axis=1)
    deq = np.asarray(numerics.dequantize(qc, sc, axis=1))
    assert np.all(np.isnan(deq[:, 0])) and np.all(np.isfinite(deq[:, 1]))


def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    n = 40_000
    # Fractional code parts 0.1, 0.3, 0.5, 0.85: nearest rounding is off by up to 0.5 of a code.
    codes = np.array([10.1, -20.3, 0.5, 100.85])
    x = jnp.asarray(np.repeat(codes[None, :], n, axis=0) / 127.0, jnp.float32)
    scale = jnp.float32(1.0)
    q = np.asarray(
        numerics.quantize(x, scale, rounding="stochastic", key=jax.random.key(7)), np.float64
    )
    assert set(np.unique(q[:, 0])) <= {10.0, 11.0}  # only the two neighbouring codes
    frac = codes - np.floor(codes)
    stderr = np.sqrt(frac * (1 - frac) / n)
    bias = q.mean(axis=0) - codes
    assert np.all(np.abs(bias) < 4 * stderr), (bias, stderr)
    nearest = np.asarray(numerics.quantize(x[:1], scale), np.float64)[0]
    # The same test would fail for round-to-nearest: its bias is far beyond 4 standard errors.
    assert np.all(np.abs(nearest - codes) > 4 * stderr)


def test_stochastic_rounding_depends_on_the_key_only():
    x = jnp.linspace(-1, 1, 257)
    a = numerics.quantize(x, jnp.float32(1.0), rounding="stochastic", key=jax.random.key(1))
    b = numerics.quantize(x, jnp.float32(1.0), rounding="stochastic", key=jax.random.key(1))
    c = numerics.quantize(x, jnp.float32(1.0), rounding="stochastic", key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bad_arguments_name_themselves():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="rounding"):
        numerics.quantize(x, jnp.float32(1.0), rounding="up")
    with pytest.raises(ValueError, match="key"):
        numerics.quantize(x, jnp.float32(1.0), rounding="stochastic")
    with pytest.raises(ValueError, match="scale.shape"):
        numerics.quantize(x, jnp.ones((2,)), axis=1)
    with pytest.raises(ValueError, match="axis"):
        numerics.maxabs(x, axis=2)
