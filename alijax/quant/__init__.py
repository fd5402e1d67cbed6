"""INT8 training as injected ops: DA-INT8 (Zhao et al., AAAI 2021) and its baselines.

    recipe = alijax.quant.da_int8()
    model = alijax.models.get_model("resnet20", ops=alijax.quant.layer_ops(recipe))

The train step threads the "quant_state" collection as described in alijax/quant/overwrite.py.
Modules: numerics (quantize / dequantize / rounding), gvq (channel classes, per-channel gradient
quantization), clipping (MCS and the baselines), dot_general and conv (custom_vjp INT8 ops and
Flax modules), recipe (Recipe and its factories), overwrite (the train-step side of the state).

Note: `alijax.quant.dot_general` and `alijax.quant.conv` are the recipe -> layer-function
factories; import the modules of the same name with `from alijax.quant.dot_general import ...`.
"""

from alijax.quant._op import OVERWRITE_COLLECTION, TELEMETRY_KEYS
from alijax.quant.conv import QuantConv, quant_conv_general_dilated
from alijax.quant.dot_general import QuantDotGeneral, int8_dot, quant_dot_general
from alijax.quant.overwrite import (
    init_quant_state,
    merge_overwrite,
    scale_updates,
    split_overwrite,
    telemetry,
)
from alijax.quant.recipe import (
    RECIPES,
    Recipe,
    bf16,
    conv,
    da_int8,
    da_int8_no_gvq,
    da_int8_no_mcs,
    dot_general,
    fp32,
    get_recipe,
    layer_ops,
    per_tensor_int8,
    unified_int8,
)

__all__ = [
    "OVERWRITE_COLLECTION",
    "TELEMETRY_KEYS",
    "RECIPES",
    "QuantConv",
    "QuantDotGeneral",
    "Recipe",
    "bf16",
    "conv",
    "da_int8",
    "da_int8_no_gvq",
    "da_int8_no_mcs",
    "dot_general",
    "fp32",
    "get_recipe",
    "init_quant_state",
    "int8_dot",
    "layer_ops",
    "merge_overwrite",
    "per_tensor_int8",
    "quant_conv_general_dilated",
    "quant_dot_general",
    "scale_updates",
    "split_overwrite",
    "telemetry",
    "unified_int8",
]
