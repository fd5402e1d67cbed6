"""ResNet-20 on scikit-learn's digits: the demo and the foundation's reference run.

python -m alijax train --config configs/digits_resnet.py --workdir runs/digits
python -m alijax train --config configs/digits_resnet.py:smoke --workdir /tmp/smoke
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.dataset = ml_collections.ConfigDict({"name": "digits", "root": "", "test_fraction": 0.2})
    config.model = ml_collections.ConfigDict(
        {"name": "resnet20", "num_classes": 10, "dtype": "float32", "recipe": "fp32"}
    )
    config.augment = "shift"
    config.batch_size = 128
    config.eval_batch_size = 256
    config.num_steps = 1200
    config.optimizer = ml_collections.ConfigDict(
        {
            "name": "sgd",
            "learning_rate": 0.1,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 5e-4,
            "warmup_steps": 50,
            "schedule": "cosine",
            "grad_clip_norm": 0.0,
        }
    )
    config.mesh_shape = (-1, 1)  # (data, model): every device on the data axis
    config.log_every = 100
    config.eval_every = 400
    config.checkpoint_every = 200
    config.max_to_keep = 3

    if arg == "smoke":
        config.model.name = "resnet_tiny"
        config.batch_size = 64
        config.num_steps = 40
        config.log_every = 10
        config.eval_every = 20
        config.checkpoint_every = 20
        config.optimizer.warmup_steps = 5
    elif arg not in (None, ""):
        raise ValueError(f"config {arg=} must be empty or 'smoke'")
    return config
