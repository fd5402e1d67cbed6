import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alijax.models import LayerOps, ResNet, get_model


def _param_count(model, shape):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize(
    "name, shape, classes, expected",
    [
        ("resnet20", (1, 32, 32, 3), 10, 0.27e6),  # He et al. 2016, Table 6: 0.27M
        ("resnet56", (1, 32, 32, 3), 10, 0.85e6),  # 0.85M
        ("resnet18", (1, 224, 224, 3), 1000, 11.69e6),  # torchvision: 11,689,512
        ("resnet50", (1, 224, 224, 3), 1000, 25.56e6),  # torchvision: 25,557,032
    ],
)
def test_parameter_counts_match_the_literature(name, shape, classes, expected):
    count = _param_count(get_model(name, num_classes=classes), shape)
    assert abs(count - expected) / expected < 0.01, count


def test_forward_shapes_and_train_mode_updates_batch_stats():
    model = get_model("resnet_tiny", num_classes=7)
    x = jnp.asarray(np.random.default_rng(0).random((4, 8, 8, 1), np.float32))
    variables = model.init(jax.random.key(0), x, train=False)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (4, 7) and logits.dtype == jnp.float32
    assert not np.allclose(
        jax.tree.leaves(updates["batch_stats"])[0], jax.tree.leaves(variables["batch_stats"])[0]
    )


def _counting(op, calls, tag):
    def wrapped(*args, **kwargs):
        calls.append(tag)
        return op(*args, **kwargs)

    return wrapped


def test_injected_ops_carry_every_product():
    calls = []
    ops = LayerOps(
        dot_general=_counting(jax.lax.dot_general, calls, "body_dense"),
        conv_general_dilated=_counting(jax.lax.conv_general_dilated, calls, "body_conv"),
        first_last=LayerOps(
            dot_general=_counting(jax.lax.dot_general, calls, "edge_dense"),
            conv_general_dilated=_counting(jax.lax.conv_general_dilated, calls, "edge_conv"),
        ),
    )
    model = get_model("resnet_tiny", num_classes=10, ops=ops)
    x = jnp.ones((2, 8, 8, 1))
    variables = model.init(jax.random.key(0), x)
    calls.clear()
    model.apply(variables, x)
    # resnet_tiny: stem + 3 blocks x 2 convs + 2 projections = 9 convs, 1 dense head.
    assert calls.count("edge_conv") == 1 and calls.count("edge_dense") == 1
    assert calls.count("body_conv") == 8 and "body_dense" not in calls


def test_injected_op_changes_the_output():
    halve = lambda *a, **k: 0.5 * jax.lax.dot_general(*a, **k)  # noqa: E731
    x = jnp.ones((2, 8, 8, 1))
    plain = get_model("resnet_tiny")
    halved = get_model("resnet_tiny", ops=LayerOps(dot_general=halve))
    variables = plain.init(jax.random.key(0), x)
    np.testing.assert_allclose(
        halved.apply(variables, x),
        0.5 * plain.apply(variables, x) + 0.5 * variables["params"]["head"]["bias"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_bf16_compute_keeps_float32_params_and_logits():
    model = get_model("resnet_tiny", dtype=jnp.bfloat16)
    x = jnp.ones((2, 8, 8, 1))
    variables = model.init(jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    assert model.apply(variables, x).dtype == jnp.float32


def test_unknown_model_and_stem_are_refused():
    with pytest.raises(ValueError, match="name='vit'"):
        get_model("vit")
    with pytest.raises(ValueError, match="stem"):
        ResNet(stage_sizes=(1,), stem="odd").init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="6n\\+2"):
        from alijax.models.resnet import _cifar

        _cifar(21)
