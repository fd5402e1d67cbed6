"""VGG with BatchNorm (Simonyan & Zisserman 2015; torchvision's vgg*_bn), with injected ops.

Each 3x3 conv (with bias, as in torchvision) is followed by BatchNorm and ReLU; "M" is a 2x2
stride-2 max-pool. Two heads:
* ImageNet: adaptive average pool to 7x7 (the identity at 224x224), then 4096-4096 dense layers
  with ReLU and dropout 0.5, then the classifier: 138.4M parameters at 1000 classes.
* CIFAR: the 1x1 map left after five pools of a 32x32 input (adaptively averaged, so other sizes
  run) goes straight to the classifier, with no hidden dense layers (the layout of
  kuangliu/pytorch-cifar): 14.7M parameters at 10 classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from alijax.models.alexnet import adaptive_avg_pool
from alijax.models.resnet import LayerOps, batch_norm

# Configuration "D" of Simonyan & Zisserman 2015, Table 1.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

# torchvision's VGG inits: He normal (fan_out) convs, N(0, 0.01) dense layers, zero biases.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_dense_init = nn.initializers.normal(0.01)


class VGG(nn.Module):
    """VGG-BN classifier. Input: images [B, H, W, C] (NHWC); output: logits float32
    [B, num_classes]."""

    num_classes: int = 10
    layers: Sequence[int | str] = VGG16
    pool_size: int = 7  # adaptive average pool output, per side
    hidden: Sequence[int] = (4096, 4096)
    dropout: float = 0.5
    ops: LayerOps = LayerOps()
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if not self.layers or self.layers[0] == "M":
            raise ValueError(f"{self.layers=} must start with a conv width")
        norm = batch_norm(train, self.dtype)
        body, edge = self.ops.conv_kwargs(), self.ops.edge()
        x = x.astype(self.dtype)
        index = 0
        for layer in self.layers:
            if layer == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            x = nn.Conv(
                int(layer),
                (3, 3),
                padding=1,
                dtype=self.dtype,
                kernel_init=_conv_init,
                name=f"conv{index}",
                **(edge.conv_kwargs() if index == 0 else body),
            )(x)
            x = nn.relu(norm(name=f"bn{index}")(x))
            index += 1
        x = adaptive_avg_pool(x, self.pool_size)
        x = x.reshape(x.shape[0], -1)
        for index, features in enumerate(self.hidden):
            x = nn.Dense(
                features,
                dtype=self.dtype,
                kernel_init=_dense_init,
                name=f"fc{index}",
                **self.ops.dense_kwargs(),
            )(x)
            x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
        logits = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=_dense_init,
            name="head",
            **edge.dense_kwargs(),
        )(x)
        return logits.astype(jnp.float32)


def vgg16_bn(**kwargs) -> VGG:
    """VGG-16-BN for 224x224 ImageNet inputs, 4096-4096 head with dropout."""
    return VGG(layers=VGG16, pool_size=7, hidden=(4096, 4096), **kwargs)


def vgg16_bn_cifar(**kwargs) -> VGG:
    """VGG-16-BN for 32x32 inputs: the 512 features go straight to the classifier."""
    return VGG(layers=VGG16, pool_size=1, hidden=(), **kwargs)


def vgg_tiny(**kwargs) -> VGG:
    """Two 8/16-channel convs, a 2x2 pool and one 32-wide hidden layer: the test variant."""
    return VGG(layers=(8, "M", 16, "M"), pool_size=2, hidden=(32,), **kwargs)
