"""INT8 training study on digits: FP32 vs per-tensor INT8 vs Unified INT8 vs DA-INT8 and its
ablations, 3 seeds each, ResNet-20 (issue 3).

python -m alijax study int8 --config configs/int8_digits.py --workdir runs/int8_digits
"""

import ml_collections
from digits_resnet import get_config as digits_config  # noqa: E402  (configs/ is on sys.path)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = digits_config("smoke" if arg == "smoke" else None)
    if arg not in (None, "", "smoke"):
        raise ValueError(f"config {arg=} must be empty or 'smoke'")
    # Digits converge in a few hundred steps (the fp32 demo: 0.989 at step 400): 600 steps keep
    # the 18 runs of the study near half an hour on 2 cores.
    config.num_steps = 600
    config.eval_every = 100
    config.log_every = 50
    config.checkpoint_every = 300
    config.study = ml_collections.ConfigDict(
        {
            "name": "int8_digits",
            "methods": [
                "fp32",
                "per_tensor_int8",
                "unified_int8",
                "da_int8",
                "da_int8_no_mcs",
                "da_int8_no_gvq",
            ],
            "seeds": [0, 1, 2],
            "layer_methods": ["per_tensor_int8", "da_int8"],
            "results_dir": "results",
        }
    )
    if arg == "smoke":
        config.num_steps = 6
        config.eval_every = 3
        config.log_every = 3
        config.checkpoint_every = 3
        config.study.methods = ["fp32", "per_tensor_int8", "da_int8"]
        config.study.seeds = [0, 1]
        config.study.name = "int8_digits_smoke"
    return config
