"""ResNets (He et al. 2016) in Flax linen, with injected dense and conv ops.

Every matrix product goes through `ops`: a `LayerOps` names the `dot_general` / `conv_general_dilated`
functions (or stateful `*_cls` modules) that `nn.Dense` and `nn.Conv` call, so the same network runs
in fp32, bf16 or any INT8 recipe without a fork (the AQT pattern `nn.Dense(dot_general=...)`).

Two layouts: CIFAR (3x3 stem, three stages of 16/32/64 channels, depth 6n+2: ResNet-20/56) and
ImageNet (7x7 stride-2 stem with max-pool, four stages: ResNet-18/34/50).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LayerOps:
    """The products a model's layers use. None keeps Flax's default (lax) op.

    `first_last` applies to the stem conv and the classifier, which stay in floating point in most
    INT8 training recipes; None means "the same as the body".
    """

    dot_general: Callable | None = None
    conv_general_dilated: Callable | None = None
    dot_general_cls: Any = None
    conv_general_dilated_cls: Any = None
    first_last: "LayerOps | None" = None

    def dense_kwargs(self) -> dict:
        kwargs = {"dot_general": self.dot_general, "dot_general_cls": self.dot_general_cls}
        return {k: v for k, v in kwargs.items() if v is not None}

    def conv_kwargs(self) -> dict:
        kwargs = {
            "conv_general_dilated": self.conv_general_dilated,
            "conv_general_dilated_cls": self.conv_general_dilated_cls,
        }
        return {k: v for k, v in kwargs.items() if v is not None}

    def edge(self) -> "LayerOps":
        """Ops for the first conv and the last dense layer."""
        return self if self.first_last is None else self.first_last


def batch_norm(train: bool, dtype: Any, epsilon: float = 1e-5) -> Callable:
    """The BatchNorm every model of the zoo uses: batch statistics in training, running averages
    (momentum 0.9) in evaluation."""
    return functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=epsilon, dtype=dtype
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut."""

    features: int
    strides: int
    conv: Callable
    norm: Callable

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.features, (3, 3), strides=self.strides, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), name="conv2")(y)
        # Zero-init of the last BN scale makes each block start as the identity (Goyal et al. 2017).
        y = self.norm(name="bn2", scale_init=nn.initializers.zeros)(y)
        if residual.shape != y.shape:
            residual = self.conv(self.features, (1, 1), strides=self.strides, name="proj")(residual)
            residual = self.norm(name="proj_bn")(residual)
        return nn.relu(y + residual)


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), stride on the 3x3 conv (ResNet v1.5)."""

    features: int
    strides: int
    conv: Callable
    norm: Callable

    @nn.compact
    def __call__(self, x):
        residual = x
        y = nn.relu(self.norm(name="bn1")(self.conv(self.features, (1, 1), name="conv1")(x)))
        y = self.conv(self.features, (3, 3), strides=self.strides, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.features * 4, (1, 1), name="conv3")(y)
        y = self.norm(name="bn3", scale_init=nn.initializers.zeros)(y)
        if residual.shape != y.shape:
            residual = self.conv(self.features * 4, (1, 1), strides=self.strides, name="proj")(x)
            residual = self.norm(name="proj_bn")(residual)
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """ResNet classifier. Input: images [B, H, W, C] (NHWC); output: logits float32 [B, num_classes]."""

    stage_sizes: Sequence[int]
    block: str = "basic"  # "basic" | "bottleneck"
    num_classes: int = 10
    width: int = 16  # channels of the first stage; doubles at each later stage
    stem: str = "cifar"  # "cifar" (3x3, stride 1) | "imagenet" (7x7 stride 2 + max-pool)
    ops: LayerOps = LayerOps()
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = batch_norm(train, self.dtype)
        conv = functools.partial(
            nn.Conv, use_bias=False, dtype=self.dtype, padding="SAME", **self.ops.conv_kwargs()
        )
        edge = self.ops.edge()
        stem_conv = functools.partial(
            nn.Conv, use_bias=False, dtype=self.dtype, padding="SAME", **edge.conv_kwargs()
        )
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = stem_conv(self.width, (7, 7), strides=2, name="stem")(x)
            x = nn.relu(norm(name="stem_bn")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        elif self.stem == "cifar":
            x = nn.relu(norm(name="stem_bn")(stem_conv(self.width, (3, 3), name="stem")(x)))
        else:
            raise ValueError(f"{self.stem=} must be 'cifar' or 'imagenet'")
        block_cls = {"basic": BasicBlock, "bottleneck": BottleneckBlock}[self.block]
        for stage, num_blocks in enumerate(self.stage_sizes):
            for index in range(num_blocks):
                strides = 2 if stage > 0 and index == 0 else 1
                x = block_cls(
                    self.width * 2**stage, strides, conv, norm, name=f"stage{stage}_block{index}"
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head", **edge.dense_kwargs())(x)
        return logits.astype(jnp.float32)


def _cifar(depth: int, **kwargs) -> ResNet:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet {depth=} must be 6n+2")
    return ResNet(stage_sizes=((depth - 2) // 6,) * 3, width=16, stem="cifar", **kwargs)


def resnet_tiny(**kwargs) -> ResNet:
    """ResNet-8 with 8 channels: the test variant (compiles and steps in well under a second)."""
    return ResNet(stage_sizes=(1, 1, 1), width=8, stem="cifar", **kwargs)


def resnet20(**kwargs) -> ResNet:
    return _cifar(20, **kwargs)


def resnet56(**kwargs) -> ResNet:
    return _cifar(56, **kwargs)


def resnet18(**kwargs) -> ResNet:
    return ResNet(stage_sizes=(2, 2, 2, 2), block="basic", width=64, stem="imagenet", **kwargs)


def resnet34(**kwargs) -> ResNet:
    return ResNet(stage_sizes=(3, 4, 6, 3), block="basic", width=64, stem="imagenet", **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet(stage_sizes=(3, 4, 6, 3), block="bottleneck", width=64, stem="imagenet", **kwargs)
