"""INT8 dense op: int32-exact products and float64 fake-quant references for value and gradients."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alijax.quant as quant
from alijax.quant import _op, clipping, gvq, numerics
from alijax.quant.dot_general import DenseProducts, int8_dot, quant_dot_general

DENSE = (((1,), (0,)), ((), ()))


def _codes(rng, shape):
    return rng.integers(-127, 128, shape).astype(np.int8)


@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (True, False), (False, True)])
def test_int8_dot_is_exact(transpose_a, transpose_b):
    rng = np.random.default_rng([transpose_a, transpose_b])
    a = _codes(rng, (3, 70, 33) if transpose_a else (3, 33, 70))
    b = _codes(rng, (3, 40, 70) if transpose_b else (3, 70, 40))
    a64 = np.swapaxes(a, 1, 2) if transpose_a else a
    b64 = np.swapaxes(b, 1, 2) if transpose_b else b
    want = np.einsum("bmk,bkn->bmn", a64.astype(np.int64), b64.astype(np.int64))
    got = int8_dot(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        int8_dot(a[0], b[0], transpose_a=transpose_a, transpose_b=transpose_b), want[0]
    )


def test_int8_dot_kernel_path_matches_xla_in_interpret_mode():
    rng = np.random.default_rng(3)
    a, b = _codes(rng, (2, 20, 33)), _codes(rng, (2, 40, 33))
    xla = int8_dot(a, b, transpose_b=True, use_kernel=False)
    kernel = int8_dot(a, b, transpose_b=True, use_kernel=True, interpret=True)
    np.testing.assert_array_equal(kernel, xla)


def test_int8_dot_rejects_float_operands():
    with pytest.raises(ValueError, match="int8"):
        int8_dot(jnp.ones((2, 2)), jnp.ones((2, 2), jnp.int8))


@functools.lru_cache(maxsize=None)
def _value_and_vjp(recipe):
    """One compiled (x, w, state, g) -> (y, g_x, g_w, new_state) per recipe."""

    def f(x, w, state):
        return quant_dot_general(x, w, DENSE, recipe=recipe, state=state, seed=5)

    def value_and_vjp(x, w, state, g):
        y, vjp = jax.vjp(f, x, w, state)
        return (y,) + vjp(g)

    return jax.jit(value_and_vjp)


def _run(recipe, x, w, g, state=None):
    """(y, g_x, g_w, new_state) of the INT8 dense op under `recipe`."""
    state = _op.init_state(_op.state_channels(recipe, w.shape[1])) if state is None else state
    return _value_and_vjp(recipe)(jnp.asarray(x), jnp.asarray(w), state, jnp.asarray(g))


def _deq(q, s):
    return np.asarray(q, np.float64) * np.asarray(s, np.float64) / 127


def _operands(seed=0, m=64, k=24, n=6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = (0.1 * rng.normal(size=(k, n))).astype(np.float32)
    # Output-gradient columns of very different sizes and shapes: one scale per channel matters.
    g = np.stack(
        [
            s * (rng.laplace(size=m) if j % 2 else rng.normal(size=m))
            for j, s in enumerate(np.logspace(-3, 0, n))
        ],
        axis=1,
    ).astype(np.float32)
    return x, w, g


def test_forward_is_exact_integer_product_then_rescale():
    x, w, _ = _operands()
    qx, sx = numerics.quantize_maxabs(x)
    qw, sw = numerics.quantize_maxabs(w)
    # Scales by hand: max |x|, max |w|.
    assert float(sx) == np.abs(x).max() and float(sw) == np.abs(w).max()
    acc = DenseProducts().forward(qx[None], qw[None], jnp.int32)[0]
    np.testing.assert_array_equal(acc, np.asarray(qx, np.int64) @ np.asarray(qw, np.int64))
    y = quant_dot_general(x, w, DENSE, recipe=quant.da_int8())
    want = _deq(qx, sx) @ _deq(qw, sw)
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def _numpy_gradient_scales(recipe, g):
    """Per-channel (GVQ) or per-tensor scales for G_W, and the per-tensor scale for G_X."""
    if recipe.granularity == "per_channel":
        if recipe.clipping == "maxabs":
            s_w = np.abs(g).max(axis=0)
        else:  # MCS: the library's scales (tested in test_clipping); the products are checked here
            gauss = gvq.classify_channels(g, axis=1)
            s_w, _ = clipping.mcs_scales(
                g,
                jnp.zeros(g.shape[1]),
                axis=1,
                is_gaussian=gauss,
                alpha=recipe.mcs_alpha,
                k=recipe.mcs_k,
                a=recipe.mcs_a,
            )
            s_w = np.asarray(s_w)
    else:
        s_w = np.full(g.shape[1], np.abs(g).max())
    return s_w.astype(np.float32), np.float32(np.abs(g).max())


@pytest.mark.parametrize(
    "recipe",
    [quant.per_tensor_int8(), quant.da_int8_no_mcs(), quant.da_int8()],
    ids=lambda r: r.name,
)
def test_gradients_match_float64_fake_quant_reference(recipe):
    x, w, g = _operands()
    y, g_x, g_w, new_state = _run(recipe, x, w, g)
    qx, sx = numerics.quantize_maxabs(x)
    qw, sw = numerics.quantize_maxabs(w)
    s_w, s_x = _numpy_gradient_scales(recipe, g)
    if recipe.granularity == "per_channel":
        np.testing.assert_allclose(new_state["clip"], s_w, rtol=1e-6)
    qg_w = numerics.quantize(g, jnp.asarray(s_w), axis=1)
    qg_x = numerics.quantize(g, jnp.asarray(s_x))
    # Integer parts, exactly: G_W = X^T G_Y, G_X = G_Y W^T on codes.
    acc_w = DenseProducts().grad_rhs(qx[None], qg_w[None], jnp.int32)[0]
    acc_x = DenseProducts().grad_lhs(qg_x[None], qw[None], jnp.int32)[0]
    np.testing.assert_array_equal(acc_w, np.asarray(qx, np.int64).T @ np.asarray(qg_w, np.int64))
    np.testing.assert_array_equal(acc_x, np.asarray(qg_x, np.int64) @ np.asarray(qw, np.int64).T)
    # After rescale: float64 fake-quant reference with the same scales.
    want_w = _deq(qx, sx).T @ (np.asarray(qg_w, np.float64) * s_w.astype(np.float64) / 127)
    want_x = _deq(qg_x, s_x) @ _deq(qw, sw).T
    # Channels differ by 1000x: compare each relative to its own size.
    col = np.maximum(np.abs(want_w).max(axis=0), 1e-30)
    np.testing.assert_allclose(np.asarray(g_w) / col, want_w / col, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g_x, want_x, rtol=1e-6, atol=1e-6 * np.abs(want_x).max())
    assert float(new_state["step"]) == 1.0


def test_per_channel_gradient_scales_beat_one_scale_on_mixed_channels():
    x, w, g = _operands()
    float_g_w = x.astype(np.float64).T @ g
    errors = {}
    for recipe in (quant.per_tensor_int8(), quant.da_int8_no_mcs()):
        _, _, g_w, state = _run(recipe, x, w, g)
        errors[recipe.name] = np.linalg.norm(g_w - float_g_w) / np.linalg.norm(float_g_w)
        t = state["telemetry"]
        assert 0.0 <= float(t["grad_rel_l2"]) < 1.0 and float(t["grad_cos"]) > 0.9
    # The small channels are rounded to zero under one tensor scale; GVQ keeps them.
    assert errors["da_int8_no_mcs"] < errors["per_tensor_int8"]


def test_telemetry_values_by_definition():
    x, w, g = _operands()
    recipe = quant.da_int8()
    _, _, g_w, state = _run(recipe, x, w, g)
    t = state["telemetry"]
    qx, sx = numerics.quantize_maxabs(x)
    ref = _deq(qx, sx).T @ g.astype(np.float64)
    rel = np.linalg.norm(np.asarray(g_w) - ref) / np.linalg.norm(ref)
    assert float(t["grad_rel_l2"]) == pytest.approx(rel, rel=1e-3)
    cos = np.sum(np.asarray(g_w) * ref) / np.linalg.norm(g_w) / np.linalg.norm(ref)
    assert float(t["grad_cos"]) == pytest.approx(cos, abs=1e-6)
    s = np.asarray(state["clip"])
    assert float(t["clip_fraction"]) == pytest.approx(np.mean(np.abs(g) > s[None, :]))
    assert float(t["inverted_t_channels"]) == float(
        np.sum(~np.asarray(gvq.classify_channels(g, 1)))
    )
    assert float(t["mcs_objective"]) == pytest.approx(
        float(clipping.mcs_objective(g, s, axis=1, alpha=recipe.mcs_alpha)), rel=1e-6
    )
    # Per-channel scales: a much lower magnitude-weighted error than one max-abs scale.
    assert float(t["mcs_objective"]) < float(t["mcs_objective_maxabs"])
    assert float(t["lr_scale"]) == 1.0


def test_unified_recipe_reports_its_lr_scale():
    x, w, g = _operands()
    _, _, _, state = _run(quant.unified_int8(), x, w, g)
    phi = float(state["telemetry"]["lr_scale"])
    assert 0.1 <= phi <= 1.0
    # phi scales the update, so it is the same without telemetry (which only logs): it was 1.
    _, _, _, quiet = _run(quant.unified_int8(telemetry=False), x, w, g)
    assert float(quiet["telemetry"]["lr_scale"]) == phi < 1.0
    assert float(quiet["telemetry"]["grad_cos"]) == 0.0  # (not computed)


def test_nan_gradient_stays_nan_and_the_clip_state_survives():
    x, w, g = _operands()
    g[5, 2] = np.nan
    recipe = quant.da_int8()
    state = _op.init_state(6)
    state["clip"] = jnp.full((6,), 0.5)
    _, g_x, g_w, new_state = _run(recipe, x, w, g, state)
    assert np.all(np.isnan(g_x))  # G_X: one scale per tensor, all poisoned
    assert np.all(np.isnan(np.asarray(g_w)[:, 2]))  # G_W: the poisoned channel
    assert np.all(np.isfinite(np.delete(np.asarray(g_w), 2, axis=1)))
    assert float(new_state["clip"][2]) == 0.5 and np.all(np.isfinite(new_state["clip"]))
    g[5, 2] = np.inf
    _, g_x, g_w, _ = _run(recipe, x, w, g)
    assert np.all(np.isnan(g_x)) and np.all(np.isnan(np.asarray(g_w)[:, 2]))


def test_nan_input_makes_the_output_nan():
    x, w, _ = _operands()
    x[0, 0] = np.inf
    assert np.all(np.isnan(quant_dot_general(x, w, DENSE, recipe=quant.da_int8())))


def test_stochastic_rounding_gradient_changes_with_the_step():
    x, w, g = _operands()
    recipe = quant.da_int8(rounding="stochastic")
    state = _op.init_state(6)
    _, _, g_w0, s1 = _run(recipe, x, w, g, state)
    _, _, g_w1, _ = _run(recipe, x, w, g, {**s1, "clip": state["clip"]})
    _, _, g_w0_again, _ = _run(recipe, x, w, g, state)
    np.testing.assert_array_equal(g_w0, g_w0_again)
    assert not np.array_equal(g_w0, g_w1)


def test_general_dimension_numbers_with_batch_and_two_contracting_dims():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)  # b, m, k1, k2
    w = rng.normal(size=(2, 5, 4, 6)).astype(np.float32)  # b, k2, k1, n
    g = rng.normal(size=(2, 3, 6)).astype(np.float32)
    dims = (((2, 3), (2, 1)), ((0,), (0,)))
    recipe = quant.per_tensor_int8()

    def f(x, w, state):
        return quant_dot_general(x, w, dims, recipe=recipe, state=state)

    @jax.jit
    def value_and_vjp(x, w, state, g):
        y, vjp = jax.vjp(f, x, w, state)
        return (y,) + vjp(g)[:2]

    y, g_x, g_w = value_and_vjp(jnp.asarray(x), jnp.asarray(w), _op.init_state(1), jnp.asarray(g))
    xh = _deq(*numerics.quantize_maxabs(x))
    wh = _deq(*numerics.quantize_maxabs(w))
    gh = _deq(*numerics.quantize_maxabs(g))
    np.testing.assert_allclose(y, np.einsum("bmkl,blkn->bmn", xh, wh), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_x, np.einsum("bmn,blkn->bmkl", gh, wh), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_w, np.einsum("bmkl,bmn->blkn", xh, gh), rtol=1e-5, atol=1e-5)
    assert y.shape == lax_shape(x, w, dims)


def lax_shape(x, w, dims):
    return jax.eval_shape(lambda a, b: jax.lax.dot_general(a, b, dims), x, w).shape


def test_bad_dimension_numbers_are_reported():
    with pytest.raises(ValueError, match="contracting dims differ"):
        quant_dot_general(jnp.ones((2, 3)), jnp.ones((4, 5)), DENSE, recipe=quant.da_int8())
    beyond = (((3,), (0,)), ((), ()))  # (ran as axis 1: 3 % 2)
    with pytest.raises(ValueError, match="lhs axes beyond its rank 2"):
        quant_dot_general(jnp.ones((4, 3)), jnp.ones((3, 2)), beyond, recipe=quant.da_int8())
    with pytest.raises(ValueError, match="must be real"):
        quant_dot_general(
            jnp.ones((4, 3), jnp.complex64), jnp.ones((3, 2)), DENSE, recipe=quant.da_int8()
        )


def test_plain_functions_refuse_stochastic_rounding():
    # Stateless, every call drew step 0's noise of one seed: the same in every layer and step.
    recipe = quant.per_tensor_int8(rounding="stochastic")
    with pytest.raises(ValueError, match="dot_general\\(recipe\\): recipe.rounding='stochastic'"):
        quant.dot_general(recipe)
    with pytest.raises(ValueError, match="conv\\(recipe\\): recipe.rounding='stochastic'"):
        quant.conv(recipe)
    assert quant.layer_ops(recipe).dot_general_cls is not None  # the stateful modules serve it


def test_plain_function_and_module_plug_into_flax_dense():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 12)), jnp.float32)
    dense = nn.Dense(5)
    params = dense.init(jax.random.key(0), x)
    want = dense.apply(params, x)
    plain = nn.Dense(5, dot_general=quant.dot_general(quant.da_int8()))
    got = plain.apply(params, x)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02
    module = nn.Dense(5, dot_general_cls=quant.layer_ops(quant.da_int8()).dot_general_cls)
    variables = module.init(jax.random.key(0), x)
    assert variables[quant.OVERWRITE_COLLECTION]["QuantDotGeneral_0"]["clip"].shape == (5,)
    got = module.apply({**variables, "params": params["params"]}, x)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02
