import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alijax import parallel, train
from alijax.data import load_digits
from alijax.models import get_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(**overrides):
    spec = importlib.util.spec_from_file_location(
        "digits_resnet", os.path.join(REPO, "configs", "digits_resnet.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    for key, value in overrides.items():
        config[key] = value
    return config


def _leaves_equal(a, b) -> bool:
    return all(
        np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)))
    )


@pytest.fixture(scope="module")
def tiny_setup():
    config = smoke_config()
    model = get_model("resnet_tiny", num_classes=10)
    optimizer = train.make_optimizer(config.optimizer, 100)
    data = load_digits()
    state = train.create_train_state(model, optimizer, data["train"]["image"][0], jax.random.key(0))
    batch = {"image": data["train"]["image"][:32], "label": data["train"]["label"][:32]}
    step = train.make_train_step(model, optimizer, augment_kind="shift")
    return state, batch, step


def _run_steps(state, batch, step_fn, mesh, num_steps=3):
    jitted = jax.jit(step_fn, donate_argnums=0)
    state = jax.device_get(state)  # fresh buffers: the step donates its input state
    if mesh is not None:
        state = jax.device_put(state, parallel.replicated(mesh))
        batch = parallel.shard_batch(batch, mesh)
    else:
        device = jax.devices()[0]
        state, batch = jax.device_put(state, device), jax.device_put(batch, device)
    losses = []
    for _ in range(num_steps):
        state, metrics = jitted(state, batch, jax.random.key(1))
        losses.append(float(metrics["loss"]))
    return state, losses


def test_train_step_on_2x4_mesh_matches_one_device(tiny_setup):
    state, batch, step_fn = tiny_setup
    single_state, single_losses = _run_steps(state, batch, step_fn, mesh=None)
    mesh = parallel.make_mesh((2, 4))
    mesh_state, mesh_losses = _run_steps(state, batch, step_fn, mesh=mesh)
    np.testing.assert_allclose(mesh_losses, single_losses, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(single_state.params), jax.tree.leaves(mesh_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_train_step_learns_and_counts_steps(tiny_setup):
    state, batch, step_fn = tiny_setup
    new_state, losses = _run_steps(state, batch, step_fn, mesh=None, num_steps=15)
    assert int(new_state.step) == 15
    assert losses[-1] < losses[0]
    # BatchNorm running statistics are threaded through the step as model_state.
    assert not _leaves_equal(new_state.model_state, state.model_state)


class _SimulatedCrash(Exception):
    pass


def _crash_at(step_to_crash):
    def on_step(step, state):
        if step == step_to_crash:
            raise _SimulatedCrash(step)

    return on_step


def test_resume_after_crash_is_bitwise_identical(tmp_path):
    config = smoke_config(num_steps=12, checkpoint_every=5, log_every=4, eval_every=100)
    reference_state, reference_summary = train.train(
        config, str(tmp_path / "straight"), progress=False
    )

    crashed = str(tmp_path / "crashed")
    with pytest.raises(_SimulatedCrash):
        train.train(config, crashed, on_step=_crash_at(8), progress=False)
    # The run died after the step-5 checkpoint and before the step-10 one.
    assert sorted(os.listdir(os.path.join(crashed, "checkpoints"))) == ["5"]
    resumed_state, resumed_summary = train.train(config, crashed, progress=False)

    assert int(resumed_state.step) == 12
    assert _leaves_equal(resumed_state.params, reference_state.params)
    assert _leaves_equal(resumed_state.model_state, reference_state.model_state)
    assert _leaves_equal(resumed_state.opt_state, reference_state.opt_state)
    assert resumed_summary["test_accuracy"] == reference_summary["test_accuracy"]
    # The metrics log reads as one run: the records the crashed run wrote after step 5 are gone.
    steps = [
        r["step"] for r in train.read_metrics(os.path.join(crashed, "metrics.jsonl")) if "loss" in r
    ]
    assert steps == [4, 8, 12]


def test_finished_run_restarts_cleanly(tmp_path):
    config = smoke_config(num_steps=6, checkpoint_every=3, log_every=3, eval_every=100)
    first_state, first = train.train(config, str(tmp_path), progress=False)
    second_state, second = train.train(config, str(tmp_path), progress=False)
    assert second["step"] == 6 and second["test_accuracy"] == first["test_accuracy"]
    assert _leaves_equal(first_state.params, second_state.params)


def test_augment_shift_keeps_shape_and_moves_pixels():
    images = jnp.asarray(np.random.default_rng(0).random((4, 8, 8, 1), np.float32))
    shifted = train.augment(images, jax.random.key(0), "shift")
    assert shifted.shape == images.shape
    assert not np.array_equal(np.asarray(shifted), np.asarray(images))
    with pytest.raises(ValueError, match="augment kind='rotate'"):
        train.augment(images, jax.random.key(0), "rotate")


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="optimizer name='lion'"):
        train.make_optimizer({"name": "lion", "learning_rate": 0.1}, 10)


def test_int8_recipe_trains_and_logs_gradient_telemetry(tmp_path):
    config = smoke_config(num_steps=4, checkpoint_every=2, log_every=2, eval_every=100)
    config.model.recipe = "da_int8"
    state, summary = train.train(config, str(tmp_path), progress=False)
    assert np.isfinite(summary["test_loss"])
    records = [
        r for r in train.read_metrics(os.path.join(tmp_path, "metrics.jsonl")) if "loss" in r
    ]
    telemetry = [k for k in records[-1] if k.startswith("quant/")]
    assert any(k.endswith("/grad_rel_l2") for k in telemetry), telemetry
    assert any(k.endswith("/grad_cos") for k in telemetry), telemetry
    # The clip state is threaded through the step and checkpointed with the rest of the state.
    assert "quant_state" in state.model_state
    resumed, _ = train.train(config, str(tmp_path), progress=False)
    assert _leaves_equal(resumed.model_state, state.model_state)
