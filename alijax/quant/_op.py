"""The INT8 training product shared by dense and conv layers: one custom_vjp, three products.

A layer supplies `products` (a frozen, hashable dataclass) with the three products of a linear
layer, each of which takes int8 operands to int32 (or float operands to float, for telemetry):

    forward(x, w)   -> y       Y  = X W
    grad_lhs(g, w)  -> like x  G_X = G_Y W^T
    grad_rhs(x, g)  -> like w  G_W = X^T G_Y

and the axes holding the output channels of y (`out_channel_axis`) and of w (`rhs_channel_axis`).

Forward: X and W quantized per tensor (max-abs, round to nearest), int8 x int8 -> int32, rescaled.
Backward: G_Y quantized per output channel for G_W (GVQ, with the recipe's clipping) and per tensor
for G_X (max-abs, or Unified INT8's clip in that recipe); both products int8 x int8 -> int32.

Clip state and telemetry ride on the "overwrite with gradient" pattern: the layer's state pytree
is an input of the op and the backward returns the *new* state as that input's cotangent. The
train step must then replace the state by its "gradient" (see alijax/quant/overwrite.py). Because
cotangents of one input add up, a layer must be applied at most once per differentiated forward.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp

from alijax.quant import clipping, gvq, numerics

OVERWRITE_COLLECTION = "quant_state"

TELEMETRY_KEYS = (
    "grad_rel_l2",  # ||G_W(int8) - G_W(float)|| / ||G_W(float)||
    "grad_cos",  # cos(G_W(int8), G_W(float))
    "mcs_objective",  # Eq. (3) on G_Y with the scales used for G_W
    "mcs_objective_maxabs",  # Eq. (3) on G_Y with one max-abs scale for the tensor
    "clip_fraction",  # fraction of G_Y entries beyond their clip
    "inverted_t_channels",  # number of output channels classed inverted-T (Eq. 2)
    "lr_scale",  # Unified INT8's phi for this layer (1 for other recipes)
)


def init_state(num_channels: int) -> dict:
    """The per-layer state: clip [C] (0 = not yet set), step [], telemetry {name: []}."""
    telemetry = {k: jnp.zeros((), jnp.float32) for k in TELEMETRY_KEYS}
    telemetry["lr_scale"] = jnp.ones((), jnp.float32)
    return {
        "clip": jnp.zeros((num_channels,), jnp.float32),
        "step": jnp.zeros((), jnp.float32),
        "telemetry": telemetry,
    }


def state_channels(recipe, num_out_channels: int) -> int:
    return num_out_channels if recipe.granularity == "per_channel" else 1


def layer_seed(path: tuple[str, ...], seed: int) -> int:
    """A static per-layer seed: the recipe's seed mixed with a hash of the module path."""
    return (zlib.crc32("/".join(path).encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


def _along(v: jax.Array, ndim: int, axis: int) -> jax.Array:
    shape = [1] * ndim
    shape[axis] = -1
    return jnp.reshape(v, shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def quantized_product(products, recipe, seed: int, x, w, state):
    """INT8 y = product(x, w) (float32) with the DA-INT8 backward; `state` from init_state."""
    del recipe, seed, state
    return _forward(products, x, w)[0]


def _forward(products, x, w):
    qx, sx = numerics.quantize_maxabs(x)
    qw, sw = numerics.quantize_maxabs(w)
    acc = products.forward(qx, qw, jnp.int32)
    return acc.astype(jnp.float32) * numerics.code_factor(sx, sw), (qx, sx, qw, sw)


def _fwd(products, recipe, seed, x, w, state):
    y, (qx, sx, qw, sw) = _forward(products, x, w)
    # Zero-size arrays carry the operand dtypes into the backward (residuals must be arrays).
    dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
    return y, (qx, sx, qw, sw, state, dtypes)


def _bwd(products, recipe, seed, res, g):
    qx, sx, qw, sw, state, (x_dtype, w_dtype) = res
    g = g.astype(jnp.float32)
    key = None
    if recipe.rounding == "stochastic":
        step = state["step"].astype(jnp.uint32)
        key = jax.random.fold_in(jax.random.key(seed), step)
    key_w, key_x = jax.random.split(key) if key is not None else (None, None)

    per_channel = recipe.granularity == "per_channel"
    c_axis = products.out_channel_axis
    gq_w = gvq.quantize_gradient(
        g,
        axis=c_axis if per_channel else None,
        clipping_mode=recipe.clipping,
        prev=state["clip"],
        recipe=recipe,
        key=key_w,
    )
    acc_w = products.grad_rhs(qx, gq_w.q, jnp.int32)
    w_factor = _along(numerics.code_factor(gq_w.scale), acc_w.ndim, products.rhs_channel_axis)
    g_w = acc_w.astype(jnp.float32) * numerics.code_factor(sx) * w_factor

    x_mode = "unified" if recipe.clipping == "unified" else "maxabs"
    if not per_channel and x_mode == recipe.clipping:
        gq_x = gq_w  # same per-tensor quantizer: reuse the codes
    else:
        gq_x = gvq.quantize_gradient(
            g, axis=None, clipping_mode=x_mode, prev=jnp.zeros((1,)), recipe=recipe, key=key_x
        )
    acc_x = products.grad_lhs(gq_x.q, qw, jnp.int32)
    g_x = acc_x.astype(jnp.float32) * numerics.code_factor(gq_x.scale[0], sw)

    if recipe.telemetry:
        telemetry = _telemetry(products, recipe, g, qx, sx, g_w, gq_w, per_channel)
    else:
        telemetry = dict(state["telemetry"])
    # phi scales the layer's update (overwrite.scale_updates), so it is kept with telemetry
    # off too: that flag only logs (off, Unified INT8 trained with phi = 1).
    telemetry["lr_scale"] = _lr_scale(recipe, gq_w)
    new_state = {"clip": gq_w.state, "step": state["step"] + 1, "telemetry": telemetry}
    return g_x.astype(x_dtype.dtype), g_w.astype(w_dtype.dtype), new_state


quantized_product.defvjp(_fwd, _bwd)


def _telemetry(products, recipe, g, qx, sx, g_w, gq_w, per_channel) -> dict:
    """Per-step layer diagnostics, all float32 scalars (see TELEMETRY_KEYS)."""
    c_axis = products.out_channel_axis
    # The float reference keeps the forward's quantized X, so the error is the gradient's alone.
    g_w_ref = products.grad_rhs(numerics.dequantize(qx, sx), g, jnp.float32)
    ref_norm = jnp.linalg.norm(g_w_ref.ravel())
    err_norm = jnp.linalg.norm((g_w - g_w_ref).ravel())
    rel = jnp.where(ref_norm > 0, err_norm / jnp.where(ref_norm > 0, ref_norm, 1.0), 0.0)
    rel = jnp.where(jnp.isfinite(ref_norm), rel, jnp.nan)
    scale = gq_w.scale if per_channel else jnp.broadcast_to(gq_w.scale, (g.shape[c_axis],))
    alpha = recipe.mcs_alpha
    inverted_t = (
        gq_w.inverted_t
        if per_channel
        else jnp.sum(~gvq.classify_channels(g, c_axis, recipe.mcs_lambda)).astype(jnp.float32)
    )
    return {
        "grad_rel_l2": rel,
        "grad_cos": clipping.cosine(g_w, g_w_ref),
        "mcs_objective": clipping.mcs_objective(g, scale, axis=c_axis, alpha=alpha),
        "mcs_objective_maxabs": clipping.mcs_objective(
            g, numerics.maxabs(g), axis=c_axis, alpha=alpha
        ),
        "clip_fraction": jnp.mean(jnp.abs(g) > _along(scale, g.ndim, c_axis)),
        "inverted_t_channels": inverted_t,
    }


def _lr_scale(recipe, gq_w) -> jax.Array:
    """Unified INT8's phi for this layer's update (1 for every other recipe)."""
    if recipe.clipping != "unified":
        return jnp.float32(1.0)
    phi = clipping.unified_lr_scale(gq_w.d_c, alpha=recipe.unified_alpha, beta=recipe.unified_beta)
    return phi.astype(jnp.float32)
