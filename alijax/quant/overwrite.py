"""The "overwrite with gradient" collection: how a train step threads INT8 clip state and telemetry.

A QuantDotGeneral / QuantConv layer keeps, in the collection `OVERWRITE_COLLECTION`
("quant_state"), per layer:

    clip       float32 [C]  the MCS tracking state s_{t-1} (C = output channels, or 1 per tensor)
    step       float32 []   backward passes seen (seeds stochastic rounding)
    telemetry  {name: float32 []}  see alijax.quant._op.TELEMETRY_KEYS

These values are *inputs* of the layer's custom_vjp op, and its backward returns their new values
as their cotangents. So the train step must (1) differentiate the loss with respect to
(params, quant_state), not mark quant_state mutable, and (2) store the quant_state "gradient" as
the new quant_state instead of handing it to the optimizer:

    rest, quant_state = split_overwrite(state.model_state)

    def loss_of(params, quant_state):
        variables = merge_overwrite({"params": params, **rest}, quant_state)
        logits, new_rest = model.apply(variables, images, train=True, mutable=list(rest), ...)
        return loss, (logits, new_rest)

    (loss, (logits, new_rest)), (grads, new_quant_state) = jax.value_and_grad(
        loss_of, argnums=(0, 1), has_aux=True)(state.params, quant_state)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    updates = scale_updates(updates, new_quant_state)      # Unified INT8's phi; 1 otherwise
    model_state = merge_overwrite(new_rest, new_quant_state)

Caveats. A layer applied twice in one differentiated forward gets the sum of two new states
(its step counts 2 per step, its clip and phi double), and so does each example of a `jax.vmap`
over the batch inside the loss: quantized layers must see the whole batch, once (not checked).
With an explicit data-parallel `psum` of gradients (shard_map / pmap), `pmean` the quant_state
instead of summing it; under `jit` with sharded inputs (GSPMD) nothing is needed, the backward sees
the global gradient. A layer not called in the step gets a zero "gradient", i.e. a reset state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from alijax.quant._op import OVERWRITE_COLLECTION


def split_overwrite(variables: Mapping[str, Any]) -> tuple[dict, Any]:
    """(variables without quant_state, quant_state or None)."""
    rest = {k: v for k, v in variables.items() if k != OVERWRITE_COLLECTION}
    return rest, variables.get(OVERWRITE_COLLECTION)


def merge_overwrite(variables: Mapping[str, Any], quant_state: Any) -> dict:
    """variables with quant_state put back; unchanged when quant_state is None."""
    merged = dict(variables)
    if quant_state is not None:
        merged[OVERWRITE_COLLECTION] = quant_state
    return merged


def init_quant_state(model, *init_args, **init_kwargs):
    """The quant_state that `model.init(*init_args, **init_kwargs)` creates, from shapes alone.

    Nothing runs or compiles (jax.eval_shape), so float32 variables -- a checkpoint, or a
    float model's init, which has the same params and batch_stats -- become INT8-trainable with
    `{**variables, OVERWRITE_COLLECTION: init_quant_state(model, rng, x)}`. None if the model has
    no quantized layer.
    """
    shapes = jax.eval_shape(lambda: model.init(*init_args, **init_kwargs))
    if OVERWRITE_COLLECTION not in shapes:
        return None

    def initial(path, leaf):
        # The values alijax.quant._op.init_state gives: zeros, except phi = 1.
        fill = 1.0 if getattr(path[-1], "key", None) == "lr_scale" else 0.0
        return jnp.full(leaf.shape, fill, leaf.dtype)

    return jax.tree_util.tree_map_with_path(initial, shapes[OVERWRITE_COLLECTION])


def _layers(quant_state) -> dict[tuple[str, ...], dict]:
    """{path of the Dense/Conv layer owning a quant module: that module's telemetry}."""
    flat = traverse_util.flatten_dict(quant_state)
    layers = {}
    for path, value in flat.items():
        if len(path) >= 3 and path[-2] == "telemetry":
            layers.setdefault(path[:-3], {})[path[-1]] = value
    return layers


def telemetry(quant_state) -> dict[str, jax.Array]:
    """Flat {"<layer path>/<metric>": scalar} view of every layer's telemetry, for logging."""
    if not quant_state:
        return {}
    return {
        "/".join(layer + (name,)): value
        for layer, values in _layers(quant_state).items()
        for name, value in values.items()
    }


def scale_updates(updates, quant_state, param_name: str = "kernel"):
    """Multiplies each quantized layer's kernel update by its telemetry "lr_scale" (phi).

    This is Unified INT8's deviation-counteractive learning-rate scaling: phi scales that layer's
    learning rate for this step. Apply it to the optimizer's *updates* (after optimizer.update), so
    it scales the step actually taken whatever the optimizer. phi is 1 for every other recipe, so
    calling it unconditionally is safe. Layers without a quant module are left unchanged.
    """
    if not quant_state:
        return updates
    flat = traverse_util.flatten_dict(updates)
    for layer, values in _layers(quant_state).items():
        key = layer + (param_name,)
        if key in flat and "lr_scale" in values:
            flat[key] = flat[key] * jnp.asarray(values["lr_scale"], flat[key].dtype)
    return traverse_util.unflatten_dict(flat)
