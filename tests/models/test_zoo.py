import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import alijax.quant
from alijax.models import InceptionV3, LayerOps, MobileNetV2, get_model
from alijax.models.alexnet import adaptive_avg_pool, max_pool_fitting
from alijax.models.mobilenet_v2 import make_divisible
from alijax.train import TrainState, make_train_step

TINY = {
    "mobilenet_v2_tiny": (4, 8, 8, 3),
    "vgg_tiny": (4, 8, 8, 3),
    "alexnet_tiny": (4, 8, 8, 3),
    "inception_tiny": (4, 8, 8, 3),
}
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _shapes(model, shape, **kwargs):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), **kwargs))


def _param_count(model, shape):
    variables = _shapes(model, shape, train=False)
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize(
    "name, shape, classes, kwargs, expected",
    [
        # torchvision.models.mobilenet_v2(): 3,504,872.
        ("mobilenet_v2", (1, 224, 224, 3), 1000, {}, 3_504_872),
        # The cifar stem changes strides only: the same layers, with a 10-class head.
        ("mobilenet_v2_cifar", (1, 32, 32, 3), 10, {}, 3_504_872 - 1281 * 990),
        ("vgg16_bn", (1, 224, 224, 3), 1000, {}, 138_365_992),  # torchvision vgg16_bn
        # 13 conv + BN layers of VGG-16 and a 512 -> 10 classifier (kuangliu/pytorch-cifar's layout).
        ("vgg16_bn_cifar", (1, 32, 32, 3), 10, {}, 14_728_266),
        ("alexnet", (1, 224, 224, 3), 1000, {}, 61_100_840),  # torchvision alexnet
        # torchvision inception_v3(aux_logits=True): 27,161,264, of which InceptionAux(768, 1000)
        # is 98,560 (1x1 conv + BN) + 2,459,136 (5x5 conv + BN) + 769,000 (fc) = 3,326,696.
        ("inception_v3", (1, 299, 299, 3), 1000, {"aux_logits": True}, 27_161_264),
        ("inception_v3", (1, 299, 299, 3), 1000, {}, 27_161_264 - 3_326_696),
    ],
)
def test_parameter_counts_match_the_literature(name, shape, classes, kwargs, expected):
    # Exact, not within 1%: the layouts are torchvision's layer for layer, so a missing bias or BN
    # would show.
    assert _param_count(get_model(name, num_classes=classes, **kwargs), shape) == expected


@pytest.mark.parametrize(
    "name, shape",
    [
        ("mobilenet_v2", (2, 224, 224, 3)),
        ("mobilenet_v2_cifar", (2, 32, 32, 3)),
        ("vgg16_bn", (2, 224, 224, 3)),
        ("vgg16_bn", (2, 64, 48, 3)),  # the adaptive pool takes other sizes
        ("vgg16_bn_cifar", (2, 32, 32, 3)),
        ("alexnet", (2, 224, 224, 3)),
        ("alexnet", (2, 32, 32, 3)),  # below torchvision's 63x63 minimum
        ("inception_v3", (2, 299, 299, 3)),
    ],
)
def test_full_models_give_float32_logits(name, shape):
    model = get_model(name, num_classes=17, dtype=jnp.bfloat16)
    variables = _shapes(model, shape)
    logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape)), variables)
    assert logits.shape == (2, 17) and logits.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))


def _last_map(model, shape, layer):
    variables = _shapes(model, shape)
    _, state = jax.eval_shape(
        lambda v: model.apply(
            v,
            jnp.zeros(shape),
            capture_intermediates=lambda m, _: m.name == layer,
            mutable=["intermediates"],
        ),
        variables,
    )
    (out,) = jax.tree.leaves(state["intermediates"])
    return out.shape


def test_mobilenet_stems_set_the_total_stride():
    assert _last_map(get_model("mobilenet_v2"), (1, 224, 224, 3), "last") == (1, 7, 7, 1280)
    assert _last_map(get_model("mobilenet_v2_cifar"), (1, 32, 32, 3), "last") == (1, 4, 4, 1280)


def test_make_divisible_matches_torchvision():
    # torchvision's _make_divisible: nearest multiple of 8, never more than 10% below.
    assert make_divisible(32 * 0.35) == 16  # 8 would be 29% below 11.2
    assert make_divisible(24 * 0.5) == 16 and make_divisible(20) == 24
    assert make_divisible(1280) == 1280 and make_divisible(3) == 8


def test_width_multiplier_scales_the_channels():
    variables = _shapes(get_model("mobilenet_v2", width=0.5), (1, 224, 224, 3))
    params = variables["params"]
    assert params["stem"]["kernel"].shape == (3, 3, 3, 16)
    assert params["stage6_block0"]["project"]["kernel"].shape == (1, 1, 480, 160)
    assert params["head"]["kernel"].shape == (1280, 10)  # last width is max(1, width) x 1280
    # Depthwise: one input channel per group.
    assert params["stage1_block0"]["dw"]["kernel"].shape == (3, 3, 1, 48)


def _reference_adaptive_pool(x, size):
    out = np.zeros((x.shape[0], size, size, x.shape[-1]), np.float64)
    h, w = x.shape[1:3]
    for i in range(size):
        for j in range(size):
            rows = slice(i * h // size, -(-(i + 1) * h // size))
            cols = slice(j * w // size, -(-(j + 1) * w // size))
            out[:, i, j] = x[:, rows, cols].astype(np.float64).mean(axis=(1, 2))
    return out


@pytest.mark.parametrize("hw, size", [((13, 13), 6), ((5, 3), 6), ((14, 7), 7), ((12, 12), 6)])
def test_adaptive_avg_pool_matches_pytorch_bins(hw, size):
    x = np.random.default_rng(0).standard_normal((2, *hw, 3)).astype(np.float32)
    np.testing.assert_allclose(
        adaptive_avg_pool(jnp.asarray(x), size), _reference_adaptive_pool(x, size), rtol=1e-5
    )


def test_max_pool_fitting_pads_only_maps_smaller_than_the_window():
    x = jnp.arange(2 * 7 * 7, dtype=jnp.float32).reshape(1, 7, 7, 2)
    np.testing.assert_array_equal(
        max_pool_fitting(x),
        jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID"),
    )
    small = jnp.asarray([[[[1.0], [5.0]], [[3.0], [2.0]]]])  # [1, 2, 2, 1]
    np.testing.assert_array_equal(max_pool_fitting(small), [[[[5.0]]]])


def _counting(op, calls, tag):
    def wrapped(*args, **kwargs):
        calls.append(tag)
        return op(*args, **kwargs)

    return wrapped


def _counting_ops(calls):
    return LayerOps(
        dot_general=_counting(jax.lax.dot_general, calls, "body_dense"),
        conv_general_dilated=_counting(jax.lax.conv_general_dilated, calls, "body_conv"),
        first_last=LayerOps(
            dot_general=_counting(jax.lax.dot_general, calls, "edge_dense"),
            conv_general_dilated=_counting(jax.lax.conv_general_dilated, calls, "edge_conv"),
        ),
    )


@pytest.mark.parametrize(
    "name, shape, body_convs, body_denses",
    [
        # stem | stage0: dw + project | 2 + 1 blocks x (expand, dw, project) | last 1x1.
        ("mobilenet_v2_tiny", (1, 32, 32, 3), 2 + 9 + 1, 0),
        ("mobilenet_v2", (1, 224, 224, 3), 2 + 16 * 3 + 1, 0),  # 52 convs in all
        ("vgg_tiny", (1, 8, 8, 3), 1, 1),
        ("vgg16_bn", (1, 224, 224, 3), 12, 2),
        ("alexnet_tiny", (1, 8, 8, 3), 4, 1),
        ("alexnet", (1, 224, 224, 3), 4, 2),
        # A 7, B 4, C 10, D 6, E 9 convs.
        ("inception_tiny", (1, 8, 8, 3), 7 + 4 + 10 + 6 + 9, 0),
        ("inception_v3", (1, 299, 299, 3), 4 + 3 * 7 + 4 + 4 * 10 + 6 + 2 * 9, 0),  # 94 in all
    ],
)
def test_injected_ops_carry_every_product(name, shape, body_convs, body_denses):
    calls = []
    model = get_model(name, num_classes=10, ops=_counting_ops(calls))
    variables = _shapes(model, shape)
    calls.clear()
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape)), variables)
    assert calls.count("edge_conv") == 1 and calls.count("edge_dense") == 1
    assert calls.count("body_conv") == body_convs and calls.count("body_dense") == body_denses
    # Every kernel in the model is used by exactly one injected product.
    kernels = [
        p
        for path, p in jax.tree_util.tree_leaves_with_path(variables["params"])
        if path[-1].key == "kernel"
    ]
    assert len(calls) == len(kernels)


def test_inception_aux_head_is_off_by_default_and_a_second_edge_classifier():
    calls = []
    model = get_model("inception_v3", num_classes=10, aux_logits=True, ops=_counting_ops(calls))
    shape = (2, 299, 299, 3)
    variables = _shapes(model, shape)
    calls.clear()
    (logits, aux), _ = jax.eval_shape(
        lambda v: model.apply(
            v,
            jnp.zeros(shape),
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(0)},
        ),
        variables,
    )
    assert logits.shape == aux.shape == (2, 10) and aux.dtype == jnp.float32
    assert calls.count("edge_dense") == 2 and calls.count("body_conv") == 93 + 2
    eval_logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape)), variables)
    assert eval_logits.shape == (2, 10)
    assert "AuxLogits" not in _shapes(get_model("inception_v3"), shape)["params"]


def _run(fn, *args):
    # The cheapest XLA backend passes: these tests check values, and compiling ~40 INT8 layers
    # (custom_vjp backward with MCS) at full optimization takes most of a minute on 2 cores.
    return jax.jit(fn).lower(*args).compile(_FAST_COMPILE)(*args)


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_train_mode_and_dropout(name):
    model = get_model(name, num_classes=7)
    x = jnp.asarray(np.random.default_rng(0).random(TINY[name], np.float32))

    def forward(x):
        variables = model.init(jax.random.key(0), x)
        train = [
            model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})
            for key in (jax.random.key(1), jax.random.key(2))
        ]
        return variables, model.apply(variables, x), train

    variables, logits, [(train_logits, updates), (other_logits, _)] = _run(forward, x)
    assert logits.shape == train_logits.shape == (x.shape[0], 7)
    assert logits.dtype == train_logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits)) and np.all(np.isfinite(train_logits))
    # Dropout draws from the "dropout" rng in train mode only.
    assert not np.allclose(train_logits, other_logits)
    if name == "alexnet_tiny":  # no normalization layers, as in torchvision
        assert "batch_stats" not in variables and not updates
        return
    # Every BatchNorm's running variance moves (a mean can stay 0: a 1x1 conv of a BN output).
    old, new = variables["batch_stats"], updates["batch_stats"]
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), old, new)
    flat = jax.tree_util.tree_leaves_with_path(moved)
    assert flat and all(v for path, v in flat if path[-1].key == "var")


@pytest.mark.parametrize("name", TINY)
def test_tiny_trains_a_step_with_da_int8(name):
    # Telemetry off: it is logging only (tested with the ResNets) and a third of the compile time.
    recipe = alijax.quant.da_int8(telemetry=False)
    model = get_model(name, num_classes=5, ops=alijax.quant.layer_ops(recipe))
    rng = np.random.default_rng(0)
    shape = TINY[name]
    batch = {
        "image": jnp.asarray(rng.random(shape, np.float32)),
        "label": jnp.asarray(rng.integers(0, 5, shape[0]), jnp.int32),
    }
    # A float model's init has the same params and batch_stats; the INT8 layers' state comes
    # from shapes alone (alijax/quant/overwrite.py), so only the train step compiles INT8 ops.
    float_model = get_model(name, num_classes=5)
    variables = _run(lambda x: float_model.init(jax.random.key(0), x), batch["image"])
    params = variables.pop("params")
    quant_state = alijax.quant.init_quant_state(model, jax.random.key(0), batch["image"])
    assert quant_state is not None
    optimizer = optax.sgd(0.1)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state={**variables, alijax.quant.OVERWRITE_COLLECTION: quant_state},
        opt_state=optimizer.init(params),
    )
    new_state, metrics = _run(make_train_step(model, optimizer), state, batch, jax.random.key(1))
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    # Every conv and dense kernel steps (biases before a BatchNorm have zero gradient).
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), state.params, new_state.params)
    kernels = [v for p, v in jax.tree_util.tree_leaves_with_path(moved) if p[-1].key == "kernel"]
    assert kernels and all(kernels)
    # The INT8 backward wrote every quantized layer's clip state (MCS tracking).
    clips = [
        v
        for p, v in jax.tree_util.tree_leaves_with_path(
            new_state.model_state[alijax.quant.OVERWRITE_COLLECTION]
        )
        if p[-1].key == "clip"
    ]
    assert clips and all(np.all(np.isfinite(c)) and np.any(np.asarray(c) > 0) for c in clips)


def test_unknown_stems_are_refused():
    x = jnp.ones((1, 8, 8, 3))
    with pytest.raises(ValueError, match="stem"):
        MobileNetV2(stem="odd").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="stem"):
        InceptionV3(stem="odd").init(jax.random.key(0), x)
