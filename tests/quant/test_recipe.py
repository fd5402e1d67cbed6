"""Recipes, layer ops, and the overwrite-with-gradient state in a real (tiny) train step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import alijax.quant as quant
from alijax import parallel
from alijax.models import LayerOps, get_model
from alijax.quant import clipping, gvq


def make_train_step(model, optimizer, loss_fn, **apply_kwargs):
    """The train step with the change alijax/train.py needs for the quant_state collection."""

    def train_step(params, model_state, opt_state, batch):
        rest, quant_state = quant.split_overwrite(model_state)

        def loss_of(params, quant_state):
            variables = quant.merge_overwrite({"params": params, **rest}, quant_state)
            out, new_rest = model.apply(variables, batch["x"], mutable=list(rest), **apply_kwargs)
            return loss_fn(out, batch), new_rest

        (loss, new_rest), (grads, new_quant_state) = jax.value_and_grad(
            loss_of, argnums=(0, 1), has_aux=True
        )(params, quant_state)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        updates = quant.scale_updates(updates, new_quant_state)
        params = optax.apply_updates(params, updates)
        return params, quant.merge_overwrite(new_rest, new_quant_state), opt_state, loss

    return train_step


# ----------------------------------------------------------------------------- recipes


def test_factories_and_their_fields():
    assert quant.fp32().forward == "fp32" and quant.bf16().forward == "bf16"
    r = quant.per_tensor_int8()
    assert (r.granularity, r.clipping) == ("per_tensor", "maxabs")
    r = quant.unified_int8()
    assert (r.granularity, r.clipping, r.unified_alpha, r.unified_beta) == (
        "per_tensor",
        "unified",
        20.0,
        0.1,
    )
    r = quant.da_int8()
    assert (r.granularity, r.clipping, r.mcs_lambda, r.mcs_k, r.mcs_a) == (
        "per_channel",
        "mcs",
        0.3,
        1.0,
        0.8,
    )
    assert not r.quantize_first_last
    assert quant.da_int8(gvq=False) == quant.da_int8_no_gvq()
    assert quant.da_int8(mcs=False).granularity == "per_channel"
    assert quant.da_int8(mcs=False).clipping == "maxabs"
    assert quant.da_int8(rounding="stochastic", mcs_alpha=3.0).mcs_alpha == 3.0
    for name in quant.RECIPES:
        assert quant.get_recipe(name).name == name
    assert len({quant.get_recipe(n) for n in quant.RECIPES}) == len(quant.RECIPES)  # hashable


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"forward": "int4"}, "forward"),
        ({"granularity": "per_row"}, "granularity"),
        ({"clipping": "none"}, "clipping"),
        ({"rounding": "up"}, "rounding"),
        ({"clipping": "unified"}, "unified"),
        ({"mcs_k": 2.0}, "mcs_k"),
        ({"mcs_lambda": 2.0}, "mcs_lambda"),
        ({"mcs_target": "min"}, "mcs_target"),
        ({"gpu_conv_operands": "float16"}, "gpu_conv_operands"),
        ({"conv_lowering": "winograd"}, "conv_lowering"),
        ({"mcs_bins": 64.0}, "mcs_bins=64.0 must be an int"),
        ({"seed": 1.5}, "seed=1.5 must be an int"),
    ],
)
def test_bad_fields_are_named(overrides, field):
    with pytest.raises(ValueError, match=field):
        quant.da_int8(**overrides)
    with pytest.raises(ValueError, match="recipe"):
        quant.get_recipe("int3")
    with pytest.raises(ValueError, match="clipping"):
        quant.fp32(clipping="mcs")


def test_layer_ops_keep_first_and_last_layers_float():
    ops = quant.layer_ops(quant.da_int8())
    assert ops.conv_general_dilated_cls is not None and ops.dot_general_cls is not None
    assert ops.edge() == LayerOps()
    both = quant.layer_ops(quant.da_int8(quantize_first_last=True))
    assert both.edge() is both
    assert quant.layer_ops(quant.fp32()) == LayerOps()
    assert quant.layer_ops(quant.bf16()).dot_general is not None


# ----------------------------------------------------------------------------- overwrite state


class _Probe(nn.Module):
    """y = x W through the INT8 dense op: with loss sum(y * c), the op's G_Y is exactly c."""

    features: int
    recipe: quant.Recipe

    @nn.compact
    def __call__(self, x):
        cls = quant.layer_ops(self.recipe).dot_general_cls
        return nn.Dense(self.features, use_bias=False, dot_general_cls=cls, name="dense")(x)


def test_overwrite_state_tracks_the_mcs_clip_across_two_steps():
    rng = np.random.default_rng(0)
    rows, k = 4096, 8
    recipe = quant.da_int8()
    model = _Probe(3, recipe)
    x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)

    def cotangent(seed):  # columns: heavy (Laplace), heavy (t3), Gaussian
        r = np.random.default_rng(seed)
        return jnp.asarray(
            np.stack([r.laplace(size=rows), r.standard_t(3, size=rows), r.normal(size=rows)], 1),
            jnp.float32,
        )

    variables = model.init(jax.random.key(0), x)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    optimizer = optax.sgd(0.1)
    step = jax.jit(
        make_train_step(model, optimizer, lambda y, b: jnp.sum(y * b["c"])), donate_argnums=()
    )
    opt_state = optimizer.init(params)
    path = (quant.OVERWRITE_COLLECTION, "dense", "QuantDotGeneral_0")

    def layer(state):
        return state[path[0]][path[1]][path[2]]

    c1, c2 = cotangent(1), cotangent(2)
    p1, s1, opt_state, _ = step(params, model_state, opt_state, {"x": x, "c": c1})
    p2, s2, _, _ = step(p1, s1, opt_state, {"x": x, "c": c2})

    def solved(c):
        return np.asarray(
            clipping.mcs_solve(c, axis=1, alpha=recipe.mcs_alpha, num_bins=recipe.mcs_bins)
        )

    np.testing.assert_array_equal(gvq.classify_channels(c1, 1), [False, False, True])
    np.testing.assert_array_equal(gvq.classify_channels(c2, 1), [False, False, True])
    amax1, amax2 = np.abs(c1).max(0), np.abs(c2).max(0)
    # Step 1: nothing tracked yet, the heavy channels take the solved clip, the Gaussian its max.
    want1 = np.array([solved(c1)[0], solved(c1)[1], amax1[2]])
    np.testing.assert_allclose(layer(s1)["clip"], want1, rtol=1e-6)
    assert want1[0] < amax1[0] and want1[1] < amax1[1]
    # Step 2: s_2 = (1 - kA) s_1 + A s*_2 with k = 1, A = 0.8 for the inverted-T channels.
    want2 = np.array([0.2 * want1[c] + 0.8 * solved(c2)[c] for c in (0, 1)] + [amax2[2]])
    np.testing.assert_allclose(layer(s2)["clip"], want2, rtol=1e-5)
    assert float(layer(s2)["step"]) == 2.0
    telemetry = quant.telemetry(s2[quant.OVERWRITE_COLLECTION])
    assert float(telemetry["dense/inverted_t_channels"]) == 2.0
    # The state follows the recursion; whether a clip is used is the exact-objective guard's call.
    assert 0.0 <= float(telemetry["dense/clip_fraction"]) < 0.1
    # Parameters went through the optimizer; the state did not.
    assert not np.allclose(p1["dense"]["kernel"], params["dense"]["kernel"])


# ----------------------------------------------------------------------------- ResNet on a mesh


IMAGES = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def fp32_variables():
    """One float32 init for every recipe: quantized layers add no params or batch_stats."""
    model = get_model("resnet_tiny", num_classes=10)
    return jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(IMAGES[:1])


def test_init_quant_state_equals_the_models_own_init():
    model = _Probe(3, quant.unified_int8())
    x = jnp.ones((4, 5))
    want = model.init(jax.random.key(0), x)[quant.OVERWRITE_COLLECTION]
    got = quant.init_quant_state(model, jax.random.key(0), x)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert quant.init_quant_state(nn.Dense(3), jax.random.key(0), x) is None


@pytest.mark.parametrize("name", sorted(quant.RECIPES))
def test_each_recipe_trains_resnet_tiny_one_step_on_8_devices(name, fp32_variables):
    # 8 simulated CPU devices (tests/conftest.py); a GPU machine runs the same step on its GPU.
    assert jax.device_count() == 8 or jax.default_backend() == "gpu"
    recipe = quant.get_recipe(name)
    model = get_model("resnet_tiny", num_classes=10, ops=quant.layer_ops(recipe))
    labels = (np.arange(16) % 10).astype(np.int32)
    params = fp32_variables["params"]
    model_state = quant.merge_overwrite(
        {"batch_stats": fp32_variables["batch_stats"]},
        quant.init_quant_state(model, jax.random.key(0), jnp.asarray(IMAGES[:1]), train=False),
    )
    optimizer = optax.sgd(0.05, momentum=0.9)
    opt_state = optimizer.init(params)
    mesh = parallel.make_mesh()
    batch = parallel.shard_batch({"x": IMAGES, "y": labels}, mesh)

    def loss_fn(logits, b):
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()

    step = jax.jit(make_train_step(model, optimizer, loss_fn, train=True))
    new_params, new_state, _, loss = step(params, model_state, opt_state, batch)
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(new_params))
    quant_state = new_state.get(quant.OVERWRITE_COLLECTION)
    if recipe.forward != "int8":
        assert quant_state is None
        return
    steps = [v for k, v in quant.telemetry(quant_state).items()]
    assert steps and all(np.isfinite(float(v)) for v in steps)
    flat = jax.tree_util.tree_leaves_with_path(quant_state)
    step_counts = [float(v) for p, v in flat if p[-1].key == "step"]
    assert len(step_counts) == 8 and set(step_counts) == {1.0}  # 8 body convs, edges stay float
    telemetry = quant.telemetry(quant_state)
    rel = [float(v) for k, v in telemetry.items() if k.endswith("grad_rel_l2")]
    assert max(rel) < 0.5
    if name == "unified_int8":
        phis = [float(v) for k, v in telemetry.items() if k.endswith("lr_scale")]
        assert all(0.1 <= p <= 1.0 for p in phis)
