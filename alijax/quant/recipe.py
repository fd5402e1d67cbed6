"""Training-precision recipes: frozen dataclasses built by factories, turned into layer ops.

    fp32()              float32 everywhere (the baseline)
    bf16()              bfloat16 operands, float32 accumulation
    per_tensor_int8()   INT8 forward and backward, one max-abs scale per tensor everywhere
    unified_int8()      Unified INT8 (Zhu et al. 2020): per-tensor gradient scales clipped by
                        direction-sensitive gradient clipping, plus learning-rate scaling phi
    da_int8()           DA-INT8 (Zhao et al. 2021): per-output-channel gradient scales for G_W
                        (GVQ) with the magnitude-aware clipping strategy (MCS)
    da_int8_no_gvq()    ablation: MCS on one per-tensor gradient scale
    da_int8_no_mcs()    ablation: GVQ with max-abs (unclipped) per-channel scales

`layer_ops(recipe)` gives the alijax.models.LayerOps a model takes; the first conv and the last
dense layer stay float32 unless `quantize_first_last=True` (as in both papers).
`dot_general(recipe)` / `conv(recipe)` give a plain function for `nn.Dense(dot_general=...)` /
`nn.Conv(conv_general_dilated=...)`: stateless, so MCS solves each step's clip afresh (no
tracking) and no telemetry is kept; `layer_ops` uses the stateful modules instead.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

from jax import lax

from alijax.quant import conv as conv_lib
from alijax.quant import dot_general as dot_lib
from alijax.quant import gvq
from alijax.quant.clipping import MCS_TARGETS
from alijax.quant.numerics import ROUNDINGS

FORWARDS = ("fp32", "bf16", "int8")
GRANULARITIES = ("per_tensor", "per_channel")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a model's dense and conv products are computed. Hashable: it is a static jit argument.

    forward: "fp32" | "bf16" | "int8". With "int8" the backward is INT8 too and the fields below
    apply; float recipes must leave clipping="none".
    granularity: scales of the output gradient used for G_W (G_X always uses one per tensor).
    clipping: "none" (float recipes) | "maxabs" | "unified" | "mcs".
    rounding: of the gradient codes ("nearest" | "stochastic"); weights and activations always
    round to nearest.
    """

    name: str = "da_int8"
    forward: str = "int8"
    granularity: str = "per_channel"
    clipping: str = "mcs"
    rounding: str = "nearest"
    # MCS (Zhao et al. 2021): lambda of Eq. (2); alpha of f(g) = exp(alpha |g| / max|g|) (ours,
    # see clipping.py); k and A of the tracking recursion (the paper's grid-searched k=1, A=0.8).
    mcs_lambda: float = 0.3
    mcs_alpha: float = 2.0
    mcs_k: float = 1.0
    mcs_a: float = 0.8
    mcs_target: str = "solved"
    mcs_bins: int = 128
    # Unified INT8 (Zhu et al. 2020): phi = max(exp(-alpha d_c), beta); clip search grid.
    unified_alpha: float = 20.0
    unified_beta: float = 0.1
    unified_candidates: int = 16
    unified_min_ratio: float = 0.3
    quantize_first_last: bool = False
    # GPU only (cuDNN has no int8 conv): the float dtype the int8 codes take in the emulated
    # integer convs, accumulated in float32 either way (see conv.py). "bfloat16" is opt-in.
    gpu_conv_operands: str = "float32"
    # How int8 convs run: "conv" (lax.conv_general_dilated: int8 on CPU, the float emulation
    # above on GPU), "im2col" (patches and one int8 GEMM a product through int8_dot: the
    # Pallas INT8 kernel on GPU; see conv.py), or "auto": on CPU G_X and G_W as "im2col"
    # (XLA:CPU's int8 transposed convs are 20-50x slower) and the forward by its shape
    # (conv._lowering_of), elsewhere "conv" until a GPU step time says which is faster there.
    # Grouped and input-dilated convs always run as "conv".
    conv_lowering: str = "auto"
    telemetry: bool = True
    seed: int = 0  # mixed into every layer's stochastic-rounding stream

    def __post_init__(self):
        for field in ("mcs_bins", "unified_candidates", "seed"):  # (a float failed in the backward)
            value = getattr(self, field)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"{field}={value!r} must be an int")
        _one_of("forward", self.forward, FORWARDS)
        _one_of("granularity", self.granularity, GRANULARITIES)
        _one_of("rounding", self.rounding, ROUNDINGS)
        _one_of("mcs_target", self.mcs_target, MCS_TARGETS)
        _one_of("gpu_conv_operands", self.gpu_conv_operands, conv_lib.GPU_CONV_OPERANDS)
        _one_of("conv_lowering", self.conv_lowering, conv_lib.CONV_LOWERINGS)
        if self.forward == "int8":
            _one_of("clipping", self.clipping, gvq.CLIPPINGS)
        elif self.clipping != "none":
            raise ValueError(
                f"clipping={self.clipping!r} must be 'none' for forward={self.forward!r}"
            )
        if self.clipping == "unified" and self.granularity != "per_tensor":
            raise ValueError(
                "clipping='unified' clips whole tensors: granularity must be 'per_tensor'"
            )
        if not 0.0 <= self.mcs_lambda <= 1.0:
            raise ValueError(f"mcs_lambda={self.mcs_lambda} must be in [0, 1]")
        if not 0.0 < self.mcs_k * self.mcs_a <= 1.0:
            raise ValueError(f"mcs_k * mcs_a = {self.mcs_k * self.mcs_a} must be in (0, 1]")
        if self.mcs_bins < 2:
            raise ValueError(f"mcs_bins={self.mcs_bins} must be >= 2")
        if self.unified_candidates < 1:
            raise ValueError(f"unified_candidates={self.unified_candidates} must be >= 1")
        if not 0.0 < self.unified_min_ratio <= 1.0:
            raise ValueError(f"unified_min_ratio={self.unified_min_ratio} must be in (0, 1]")
        if not 0.0 < self.unified_beta <= 1.0:
            raise ValueError(f"unified_beta={self.unified_beta} must be in (0, 1]")


def _one_of(field: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r} must be one of {choices}")


# ----------------------------------------------------------------------------- factories


def fp32(**overrides) -> Recipe:
    return Recipe(**{"name": "fp32", "forward": "fp32", "clipping": "none", **overrides})


def bf16(**overrides) -> Recipe:
    return Recipe(**{"name": "bf16", "forward": "bf16", "clipping": "none", **overrides})


def per_tensor_int8(**overrides) -> Recipe:
    base = {"name": "per_tensor_int8", "granularity": "per_tensor", "clipping": "maxabs"}
    return Recipe(**{**base, **overrides})


def unified_int8(**overrides) -> Recipe:
    base = {"name": "unified_int8", "granularity": "per_tensor", "clipping": "unified"}
    return Recipe(**{**base, **overrides})


def da_int8(gvq: bool = True, mcs: bool = True, **overrides) -> Recipe:
    """DA-INT8; gvq=False / mcs=False give the paper's two ablations (also named factories)."""
    name = "da_int8" + ("" if gvq else "_no_gvq") + ("" if mcs else "_no_mcs")
    base = {
        "name": name,
        "granularity": "per_channel" if gvq else "per_tensor",
        "clipping": "mcs" if mcs else "maxabs",
    }
    return Recipe(**{**base, **overrides})


def da_int8_no_gvq(**overrides) -> Recipe:
    return da_int8(gvq=False, **overrides)


def da_int8_no_mcs(**overrides) -> Recipe:
    return da_int8(mcs=False, **overrides)


RECIPES = {
    f.__name__: f
    for f in (fp32, bf16, per_tensor_int8, unified_int8, da_int8, da_int8_no_gvq, da_int8_no_mcs)
}


def get_recipe(name: str, **overrides) -> Recipe:
    """The recipe its factory `name` builds (the name the study reports it under)."""
    if name not in RECIPES:
        raise ValueError(f"recipe {name=} is not one of {sorted(RECIPES)}")
    return RECIPES[name](**overrides)


# ----------------------------------------------------------------------------- layer ops


def _check_stateless(recipe: Recipe, name: str) -> None:
    """The plain functions keep no state: every call is step 0 of one seed, so stochastic
    rounding would draw the same noise in every layer and step (never averaging out)."""
    if recipe.forward == "int8" and recipe.rounding == "stochastic":
        raise ValueError(
            f"{name}(recipe): recipe.rounding='stochastic' needs a step and a layer to draw "
            "fresh noise from, and a plain function has neither; use layer_ops(recipe) (the "
            "stateful modules), or quant_dot_general / quant_conv_general_dilated with a "
            "seed of each layer and step"
        )


def dot_general(recipe: Recipe):
    """A function with lax.dot_general's signature, for `nn.Dense(dot_general=...)` (not for
    stochastic rounding: see _check_stateless)."""
    _check_stateless(recipe, "dot_general")
    if recipe.forward == "fp32":
        return lax.dot_general
    if recipe.forward == "bf16":
        return dot_lib.bf16_dot_general

    def int8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del precision
        return dot_lib.quant_dot_general(
            lhs,
            rhs,
            dimension_numbers,
            recipe=recipe,
            seed=recipe.seed,
            preferred_element_type=preferred_element_type,
        )

    return int8_dot_general


def conv(recipe: Recipe):
    """A function with lax.conv_general_dilated's signature, for nn.Conv(conv_general_dilated=)
    (not for stochastic rounding: see _check_stateless)."""
    _check_stateless(recipe, "conv")
    if recipe.forward == "fp32":
        return lax.conv_general_dilated
    if recipe.forward == "bf16":
        return conv_lib.bf16_conv_general_dilated
    return functools.partial(conv_lib.quant_conv_general_dilated, recipe=recipe, seed=recipe.seed)


def layer_ops(recipe: Recipe):
    """alijax.models.LayerOps for `recipe`: stateful INT8 modules in the body, float32 edges."""
    from alijax.models import LayerOps  # models do not import quant; keep the edge one-way here

    if recipe.forward == "fp32":
        return LayerOps()
    if recipe.forward == "bf16":
        return LayerOps(
            dot_general=dot_lib.bf16_dot_general,
            conv_general_dilated=conv_lib.bf16_conv_general_dilated,
        )
    body = LayerOps(
        dot_general_cls=functools.partial(dot_lib.QuantDotGeneral, recipe=recipe),
        conv_general_dilated_cls=functools.partial(conv_lib.QuantConv, recipe=recipe),
    )
    if recipe.quantize_first_last:
        return body
    return dataclasses.replace(body, first_last=LayerOps())
