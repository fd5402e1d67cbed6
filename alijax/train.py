"""Pure train step, evaluation, and the training loop with metrics, checkpoints and resume.

`train_step(state, batch, rng) -> (state, metrics)` is a pure function built from a model, a loss
and an optax optimizer; it is jitted with the state donated. The rng of a step is
`fold_in(rng, state.step)` and the batch of a step is a pure function of (seed, step), so a run
resumed from a checkpoint is bitwise identical to one that never stopped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from alijax import parallel
from alijax.data import batching
from alijax.data.files import atomic_write
from alijax.quant.overwrite import merge_overwrite, scale_updates, split_overwrite, telemetry


class TrainState(flax.struct.PyTreeNode):
    """Everything a step changes. model_state holds the non-parameter collections
    (batch_stats, quantizer state, ...) that the model updates in training mode."""

    step: jax.Array  # int32 scalar
    params: Any
    model_state: Any
    opt_state: Any


# ----------------------------------------------------------------------------- optimizer


def make_schedule(cfg: Mapping, num_steps: int) -> optax.Schedule:
    """Linear warm-up then cosine decay to zero (or a constant rate)."""
    base = cfg["learning_rate"]
    warmup = min(cfg.get("warmup_steps", 0), num_steps)
    if cfg.get("schedule", "cosine") == "constant":
        return optax.constant_schedule(base)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else base,
        peak_value=base,
        warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1),
        end_value=0.0,
    )


def _decay_mask(params):
    # Weight decay on kernels only: BN scales/biases and dense biases are left free.
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: Mapping, num_steps: int) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum or AdamW, decoupled-from-BN weight decay, optional clipping."""
    schedule = make_schedule(cfg, num_steps)
    name = cfg["name"]
    if name == "sgd":
        core = optax.chain(
            optax.add_decayed_weights(cfg.get("weight_decay", 0.0), mask=_decay_mask),
            optax.sgd(
                schedule, momentum=cfg.get("momentum", 0.9), nesterov=cfg.get("nesterov", True)
            ),
        )
    elif name == "adamw":
        core = optax.adamw(schedule, weight_decay=cfg.get("weight_decay", 0.0), mask=_decay_mask)
    else:
        raise ValueError(f"optimizer {name=} must be 'sgd' or 'adamw'")
    clip = cfg.get("grad_clip_norm", 0.0)
    return optax.chain(optax.clip_by_global_norm(clip), core) if clip else core


# ----------------------------------------------------------------------------- steps


def augment(images: jax.Array, rng: jax.Array, kind: str) -> jax.Array:
    """Random translation by zero-padded crop ("shift") and horizontal flip ("shift_flip").

    images: [B, H, W, C]. The pad is H // 8 (4 px on CIFAR's 32, 1 px on digits' 8).
    """
    if kind == "none":
        return images
    if kind not in ("shift", "shift_flip"):
        raise ValueError(f"augment {kind=} must be 'none', 'shift' or 'shift_flip'")
    batch, height, width, _ = images.shape
    pad = max(1, height // 8)
    shift_rng, flip_rng = jax.random.split(rng)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(shift_rng, (batch, 2), 0, 2 * pad + 1)
    crop = lambda img, off: jax.lax.dynamic_slice(  # noqa: E731
        img, (off[0], off[1], 0), (height, width, img.shape[-1])
    )
    images = jax.vmap(crop)(padded, offsets)
    if kind == "shift_flip":
        flip = jax.random.bernoulli(flip_rng, 0.5, (batch, 1, 1, 1))
        images = jnp.where(flip, images[:, :, ::-1], images)
    return images


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy. logits float32 [B, C], labels int32 [B]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def create_train_state(model, optimizer, sample_image: np.ndarray, rng: jax.Array) -> TrainState:
    """Initialises parameters from a single example image [H, W, C]."""
    variables = model.init(rng, jnp.asarray(sample_image)[None], train=False)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=optimizer.init(params),
    )


def make_train_step(
    model,
    optimizer: optax.GradientTransformation,
    loss_fn: Callable = cross_entropy_loss,
    augment_kind: str = "none",
) -> Callable:
    """Builds the pure `train_step(state, batch, rng) -> (state, metrics)`.

    batch: {"image": [B, H, W, C], "label": int32 [B]}; metrics: scalars loss, accuracy, grad_norm.
    """

    def train_step(state: TrainState, batch, rng):
        step_rng = jax.random.fold_in(rng, state.step)
        augment_rng, dropout_rng = jax.random.split(step_rng)
        images = augment(batch["image"], augment_rng, augment_kind)
        # INT8 layers keep clip state and telemetry in an "overwrite" collection: it is
        # differentiated, and its "gradient" is its new value (alijax/quant/overwrite.py).
        rest, quant_state = split_overwrite(state.model_state)

        def loss_of(params, quant_state):
            logits, new_rest = model.apply(
                merge_overwrite({"params": params, **rest}, quant_state),
                images,
                train=True,
                mutable=list(rest),
                rngs={"dropout": dropout_rng},
            )
            return loss_fn(logits, batch["label"]), (logits, new_rest)

        (loss, (logits, new_rest)), (grads, new_quant_state) = jax.value_and_grad(
            loss_of, argnums=(0, 1), has_aux=True
        )(state.params, quant_state)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        updates = scale_updates(updates, new_quant_state)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            model_state=merge_overwrite(dict(new_rest), new_quant_state),
            opt_state=opt_state,
        )
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
            "grad_norm": optax.tree.norm(grads),
            **{f"quant/{k}": v for k, v in telemetry(new_quant_state).items()},
        }
        return new_state, metrics

    return train_step


def make_eval_step(model, loss_fn: Callable = cross_entropy_loss) -> Callable:
    """Builds `eval_step(state, batch) -> sums` over a padded batch with "mask" [B]."""

    def eval_step(state: TrainState, batch):
        logits = model.apply(
            {"params": state.params, **state.model_state}, batch["image"], train=False
        )
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        mask = batch["mask"]
        return {
            "loss_sum": jnp.sum(per_example * mask),
            "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
            "count": jnp.sum(mask),
        }

    del loss_fn  # evaluation reports cross-entropy whatever the training loss
    return eval_step


def evaluate(eval_step, state, arrays: Mapping[str, np.ndarray], batch_size: int, mesh) -> dict:
    """Loss and accuracy over every example of `arrays` ({"image", "label"})."""
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for batch in batching.eval_batches(arrays, batch_size, mesh):
        sums = jax.device_get(eval_step(state, batch))
        totals = {k: totals[k] + float(sums[k]) for k in totals}
    return {
        "loss": totals["loss_sum"] / totals["count"],
        "accuracy": totals["correct"] / totals["count"],
    }


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, every: int, max_to_keep: int) -> ocp.CheckpointManager:
    """Orbax manager under workdir/checkpoints; Orbax writes each step to a temporary folder and
    renames it when complete, so a crash mid-save never leaves a checkpoint that restores."""
    del every  # the loop decides when to save; Orbax would also save the very first step
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"), options=options
    )


def restore_latest(manager: ocp.CheckpointManager, state: TrainState) -> TrainState:
    """The latest checkpoint restored onto `state`'s shapes and shardings, or `state` if none."""
    latest = manager.latest_step()
    if latest is None:
        return state
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return manager.restore(latest, args=ocp.args.StandardRestore(abstract))


# ----------------------------------------------------------------------------- metrics log


class MetricsLog:
    """Appends one JSON object per record to workdir/metrics.jsonl.

    On resume from step s the records after s (written by the run that crashed) are dropped, so
    the file reads as one uninterrupted run.
    """

    def __init__(self, workdir: str, start_step: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
        _atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: Mapping) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics.jsonl file (an empty list when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _atomic_write(path: str, text: str) -> None:
    with atomic_write(path, text=True) as f:
        f.write(text)


def _to_python(tree) -> dict:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


# ----------------------------------------------------------------------------- loop


def build_model(model_cfg: Mapping):
    """The model named by model_cfg, its products injected from model_cfg["recipe"] (default
    "fp32"; any name in alijax.quant.RECIPES), with model_cfg["recipe_overrides"] (a dict of
    Recipe fields, optional) applied."""
    from alijax.models import get_model
    from alijax.quant import get_recipe, layer_ops

    recipe = get_recipe(
        model_cfg.get("recipe", "fp32"), **dict(model_cfg.get("recipe_overrides", {}))
    )
    return get_model(
        model_cfg["name"],
        num_classes=model_cfg["num_classes"],
        dtype=jnp.dtype(model_cfg.get("dtype", "float32")),
        ops=layer_ops(recipe),
    )


def train(
    config,
    workdir: str,
    *,
    mesh=None,
    on_step: Callable[[int, TrainState], None] | None = None,
    progress: bool = True,
) -> tuple[TrainState, dict]:
    """Trains `config` (see configs/digits_resnet.py), resuming from workdir's latest checkpoint.

    on_step(step, state) is called after every step (used by tests to stop a run). Returns the
    final state and a summary {"step", "test_accuracy", "test_loss", "train_time_s"}.
    """
    from alijax.data import load_dataset

    os.makedirs(workdir, exist_ok=True)
    _atomic_write(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    mesh = mesh if mesh is not None else parallel.make_mesh(tuple(config.mesh_shape))
    data = load_dataset(config.dataset, seed=config.seed)
    model = build_model(config.model)
    optimizer = make_optimizer(config.optimizer, config.num_steps)
    schedule = make_schedule(config.optimizer, config.num_steps)

    rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(rng)
    state = create_train_state(model, optimizer, data["train"]["image"][0], init_rng)
    state = jax.device_put(state, parallel.replicated(mesh))
    manager = checkpoint_manager(workdir, config.checkpoint_every, config.max_to_keep)
    state = restore_latest(manager, state)
    start_step = int(state.step)

    replicated = parallel.replicated(mesh)
    train_step = jax.jit(
        make_train_step(model, optimizer, augment_kind=config.augment),
        donate_argnums=0,
        out_shardings=replicated,
    )
    eval_step = jax.jit(make_eval_step(model))
    log = MetricsLog(workdir, start_step)
    if start_step:
        tqdm.write(f"resumed from {workdir} at step {start_step}")

    bar = tqdm(
        total=config.num_steps,
        initial=start_step,
        disable=not progress,
        desc="train",
        mininterval=1.0,
    )
    pending: list = []
    last_time, last_step = time.perf_counter(), start_step
    train_time = 0.0
    try:
        batches = batching.train_batches(
            data["train"], config.batch_size, config.seed, start_step=start_step, mesh=mesh
        )
        for step, batch in batches:
            if step >= config.num_steps:
                break
            state, metrics = train_step(state, batch, step_rng)
            pending.append(metrics)
            done = step + 1
            bar.update(1)
            if done % config.checkpoint_every == 0:
                manager.save(done, args=ocp.args.StandardSave(state))
            if done % config.log_every == 0 or done == config.num_steps:
                now = time.perf_counter()
                averaged = _to_python(jax.tree.map(lambda *m: jnp.mean(jnp.stack(m)), *pending))
                steps_per_s = (done - last_step) / (now - last_time)
                train_time += now - last_time
                lr = float(schedule(done - 1))
                record = {"step": done, **averaged, "lr": lr, "steps_per_s": steps_per_s}
                log.write(record)
                bar.write(_format_record(record))
                pending, last_time, last_step = [], time.perf_counter(), done
            if done % config.eval_every == 0 and done != config.num_steps:
                result = evaluate(eval_step, state, data["test"], config.eval_batch_size, mesh)
                record = {
                    "step": done,
                    "test_loss": result["loss"],
                    "test_accuracy": result["accuracy"],
                }
                log.write(record)
                bar.write(_format_record(record))
                last_time = time.perf_counter()
            if on_step is not None:
                on_step(done, state)
    finally:
        bar.close()
        manager.wait_until_finished()

    final_step = int(state.step)
    if manager.latest_step() != final_step:
        manager.save(final_step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
    manager.close()
    result = evaluate(eval_step, state, data["test"], config.eval_batch_size, mesh)
    summary = {
        "step": final_step,
        "test_accuracy": result["accuracy"],
        "test_loss": result["loss"],
        "train_time_s": train_time,
    }
    log.write(
        {"step": final_step, "test_loss": result["loss"], "test_accuracy": result["accuracy"]}
    )
    _atomic_write(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return state, summary


def _format_record(record: Mapping) -> str:
    """One console line; per-layer quantization telemetry goes to metrics.jsonl only."""
    parts = [f"step {record['step']:>6d}"]
    for key, value in record.items():
        if key != "step" and not key.startswith("quant/"):
            parts.append(f"{key} {value:.4g}")
    return "  ".join(parts)
