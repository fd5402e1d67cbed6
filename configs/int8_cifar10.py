"""INT8 training study on CIFAR-10: the digits study's methods and seeds, ResNet-20, standard
augmentation. The binary files must be on disk (no download at run time):

python -m alijax study int8 --config configs/int8_cifar10.py --set dataset.root=/data/cifar-10-batches-bin

The schedule follows the usual CIFAR ResNet-20 recipe in spirit (SGD + Nesterov 0.9, lr 0.1,
weight decay 5e-4, batch 128) with a cosine schedule over 160 epochs (62,400 steps).
"""

import ml_collections
from int8_digits import get_config as digits_study


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = digits_study("smoke" if arg == "smoke" else None)
    config.dataset = ml_collections.ConfigDict({"name": "cifar10", "root": ""})
    config.model.name = "resnet20"
    config.augment = "shift_flip"
    config.batch_size = 128
    config.eval_batch_size = 500
    config.num_steps = 62_400
    config.eval_every = 3_900
    config.log_every = 390
    config.checkpoint_every = 3_900
    config.optimizer.warmup_steps = 390
    config.study.name = "int8_cifar10"
    if arg == "smoke":  # two steps on whatever files dataset.root names (the tests write tiny ones)
        config.model.name = "resnet_tiny"
        config.batch_size = 16
        config.eval_batch_size = 16
        config.num_steps = 2
        config.eval_every = 2
        config.log_every = 1
        config.checkpoint_every = 2
        config.optimizer.warmup_steps = 1
        config.study.methods = ["fp32", "da_int8"]
        config.study.seeds = [0]
        config.study.name = "int8_cifar10_smoke"
    return config
