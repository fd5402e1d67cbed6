"""alijax.ann.codes: bit order against numpy, ITQ against PCA-sign, argument checks."""

import jax
import numpy as np
import pytest

from alijax.ann import codes


def clustered(seed=0, n=2000, dim=64, clusters=20, latent=8):
    """Gaussian clusters, each spread over its own random latent-dimensional subspace plus a
    little isotropic noise: low intrinsic dimension, as in real descriptors (SIFT, CNN)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)) * 3
    basis = rng.normal(size=(clusters, latent, dim)) * (2 / np.sqrt(latent))
    label = rng.integers(0, clusters, n)
    z = rng.normal(size=(n, latent))
    x = centres[label] + np.einsum("nl,nld->nd", z, basis[label])
    return (x + 0.1 * rng.normal(size=(n, dim))).astype(np.float32)


def numpy_codes(binarizer, x):
    v = (x.astype(np.float64) - np.asarray(binarizer.mean)) @ np.asarray(binarizer.projection)
    bits = v > 0
    return np.packbits(bits, axis=1, bitorder="little").view("<u4")


@pytest.mark.parametrize("fit", ["lsh", "itq"])
def test_encode_matches_numpy_bit_order(fit):
    x = clustered(n=500)
    key = jax.random.key(1)
    b = (
        codes.fit_lsh(64, 96, key, vectors=x)
        if fit == "lsh"
        else codes.fit_itq(x, 96, iterations=5, rng=key)
    )
    got = codes.encode(b, x, batch_size=128)
    want = numpy_codes(b, x)
    assert got.dtype == np.uint32 and got.shape == (500, 3)
    # float32 vs float64 projections may disagree on values within rounding of 0.
    v = (x - np.asarray(b.mean)) @ np.asarray(b.projection)
    near_zero = np.abs(v) < 1e-4
    diff = np.unpackbits(got.view(np.uint8), axis=1, bitorder="little") != np.unpackbits(
        want.view(np.uint8), axis=1, bitorder="little"
    )
    assert not (diff & ~near_zero).any()


def test_encode_batches_agree():
    x = clustered(n=300)
    b = codes.fit_lsh(64, 64, jax.random.key(0), vectors=x)
    np.testing.assert_array_equal(codes.encode(b, x, batch_size=7), codes.encode(b, x))


def test_projection_asks_for_full_float32():
    # A GPU may multiply float32 in TF32 by default (a TPU in bfloat16), and a code would then
    # depend on the program that computed it (encode, the search's, a small add's): the
    # projection asks for HIGHEST precision. (On CPU the results are the same either way.)
    binarizer = codes.Binarizer(np.zeros(16, np.float32), np.eye(16, 32, dtype=np.float32))
    jaxpr = jax.make_jaxpr(codes.codes_of)(binarizer, np.ones((3, 16), np.float32))
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 1
    assert str(dots[0].params["precision"]) == "(Precision.HIGHEST, Precision.HIGHEST)"


def test_itq_fits_in_full_float32(monkeypatch):
    # The fit's program is traced under float32 matmul precision (not a GPU's TF32 default).
    seen = []
    real = codes._fit_itq

    def fit(*args):
        seen.append(jax.config.jax_default_matmul_precision)
        return real(*args)

    monkeypatch.setattr(codes, "_fit_itq", fit)
    codes.fit_itq(clustered(n=200), 32, iterations=2)
    assert seen == ["float32"]


def test_itq_lowers_quantization_loss_vs_pca_sign():
    x = clustered(n=2000)
    pca = codes.fit_pca(x, 32, jax.random.key(0))
    itq = codes.fit_itq(x, 32, iterations=50, rng=jax.random.key(0))
    loss_pca, loss_itq = codes.quantization_loss(pca, x), codes.quantization_loss(itq, x)
    assert loss_itq < 0.95 * loss_pca, (loss_itq, loss_pca)
    # The projection spans the same PCA subspace: orthonormal columns.
    p = np.asarray(itq.projection)
    np.testing.assert_allclose(p.T @ p, np.eye(32), atol=1e-4)


def test_more_bits_than_dimensions_is_a_tight_frame():
    x = clustered(n=500, dim=16)
    b = codes.fit_itq(x, 64, iterations=10, rng=jax.random.key(0))
    p = np.asarray(b.projection)
    assert p.shape == (16, 64)
    np.testing.assert_allclose(p @ p.T, np.eye(16), atol=1e-4)
    assert codes.encode(b, x).shape == (500, 2)


@pytest.mark.parametrize("bits", [0, 33, 100, -32])
def test_bits_must_be_a_multiple_of_32(bits):
    x = clustered(n=100)
    with pytest.raises(ValueError, match="bits"):
        codes.fit_lsh(64, bits, jax.random.key(0))
    with pytest.raises(ValueError, match="bits"):
        codes.fit_itq(x, bits)


def test_nan_and_wrong_dimension_refused():
    x = clustered(n=100)
    x[3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        codes.fit_itq(x, 32)
    b = codes.fit_lsh(64, 32, jax.random.key(0))
    with pytest.raises(ValueError, match="vectors.shape"):
        codes.encode(b, np.zeros((4, 63), np.float32))


def test_itq_fits_data_of_any_magnitude():
    # x^T x overflowed float32 past |x| ~ 1e15 (here 1e19): a NaN projection, every code equal.
    x = clustered(n=300, dim=16)
    small = codes.fit_itq(x, 32, iterations=5)
    huge = codes.fit_itq(x * np.float32(1e19), 32, iterations=5)
    assert np.isfinite(np.asarray(huge.projection)).all()
    # The same directions (the scale is a power of two's rounding away): codes nearly equal.
    same = codes.encode(small, x) == codes.encode(huge, x * np.float32(1e19))
    assert same.mean() > 0.99


def test_fit_arguments_refused():
    x = clustered(n=100)
    with pytest.raises(ValueError, match="max_fit_points=0 must be a positive int"):
        codes.fit_itq(x, 32, max_fit_points=0)
    with pytest.raises(ValueError, match=r"vectors.shape=\(10, 0\) must be \[N > 0, D > 0\]"):
        codes.fit_itq(np.zeros((10, 0), np.float32), 32)
