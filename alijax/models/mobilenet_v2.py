"""MobileNetV2 (Sandler et al. 2018) in Flax linen, with injected dense and conv ops.

Inverted residual blocks: 1x1 expansion (ratio t) + ReLU6, 3x3 depthwise conv + ReLU6, linear 1x1
projection; identity shortcut when the stride is 1 and the width is unchanged. The depthwise conv
is an `nn.Conv` with `feature_group_count` = its channels, so it goes through the injected conv
like every other layer. Layout and channel rounding follow torchvision (`_make_divisible`).

Two stems:
* "imagenet": 3x3 stride-2 stem and Table 2's strides (total stride 32; 224 -> 7x7).
* "cifar": stem at stride 1 and the first stride-2 stage (24 channels) at stride 1 (total stride 8;
  32 -> 4x4), the small-input layout of kuangliu/pytorch-cifar. Same parameters as "imagenet".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from alijax.models.resnet import LayerOps, batch_norm

# (expansion t, channels c, repeats n, stride s) of each stage: Sandler et al. 2018, Table 2.
IMAGENET_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

# torchvision's MobileNetV2 inits: He normal (fan_out) convs, N(0, 0.01) classifier.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_dense_init = nn.initializers.normal(0.01)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds a channel count to a multiple of divisor, never more than 10% down (torchvision)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when expansion = 1), 3x3 depthwise with stride, linear 1x1 project."""

    features: int
    strides: int
    expansion: int
    conv: Callable
    norm: Callable

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        hidden = int(round(in_features * self.expansion))
        y = x
        if self.expansion != 1:
            y = nn.relu6(self.norm(name="expand_bn")(self.conv(hidden, (1, 1), name="expand")(y)))
        y = self.conv(
            hidden, (3, 3), strides=self.strides, padding=1, feature_group_count=hidden, name="dw"
        )(y)
        y = nn.relu6(self.norm(name="dw_bn")(y))
        y = self.norm(name="project_bn")(self.conv(self.features, (1, 1), name="project")(y))
        if self.strides == 1 and in_features == self.features:
            y = x + y
        return y


class MobileNetV2(nn.Module):
    """MobileNetV2 classifier. Input: images [B, H, W, C] (NHWC); output: logits float32
    [B, num_classes]."""

    num_classes: int = 10
    width: float = 1.0  # width multiplier alpha; channels are rounded to multiples of round_to
    stem: str = "imagenet"  # "imagenet" (stride 2) | "cifar" (stride 1, first stride-2 stage at 1)
    settings: Sequence[tuple[int, int, int, int]] = IMAGENET_SETTINGS
    stem_features: int = 32
    last_features: int = 1280  # scaled by max(1, width), as in the paper
    round_to: int = 8
    dropout: float = 0.2
    ops: LayerOps = LayerOps()
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"{self.stem=} must be 'cifar' or 'imagenet'")
        norm = batch_norm(train, self.dtype)
        conv = functools.partial(
            nn.Conv,
            use_bias=False,
            dtype=self.dtype,
            padding=0,
            kernel_init=_conv_init,
            **self.ops.conv_kwargs(),
        )
        edge = self.ops.edge()
        small = self.stem == "cifar"
        x = x.astype(self.dtype)
        x = nn.Conv(
            make_divisible(self.stem_features * self.width, self.round_to),
            (3, 3),
            strides=1 if small else 2,
            padding=1,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=_conv_init,
            name="stem",
            **edge.conv_kwargs(),
        )(x)
        x = nn.relu6(norm(name="stem_bn")(x))
        reduced = not small  # the cifar stem keeps the first stride-2 stage at stride 1
        for stage, (expansion, channels, repeats, stride) in enumerate(self.settings):
            if stride == 2 and not reduced:
                stride, reduced = 1, True
            features = make_divisible(channels * self.width, self.round_to)
            for index in range(repeats):
                x = InvertedResidual(
                    features,
                    stride if index == 0 else 1,
                    expansion,
                    conv,
                    norm,
                    name=f"stage{stage}_block{index}",
                )(x)
        last = make_divisible(self.last_features * max(1.0, self.width), self.round_to)
        x = nn.relu6(norm(name="last_bn")(conv(last, (1, 1), name="last")(x)))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        logits = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=_dense_init,
            name="head",
            **edge.dense_kwargs(),
        )(x)
        return logits.astype(jnp.float32)


def mobilenet_v2(**kwargs) -> MobileNetV2:
    """MobileNetV2 for 224x224 ImageNet inputs (width=1.0: 3.50M parameters at 1000 classes)."""
    return MobileNetV2(stem="imagenet", **kwargs)


def mobilenet_v2_cifar(**kwargs) -> MobileNetV2:
    """MobileNetV2 for 32x32 inputs: stem stride 1, the 24-channel stage at stride 1 (32 -> 4x4)."""
    return MobileNetV2(stem="cifar", **kwargs)


def mobilenet_v2_tiny(**kwargs) -> MobileNetV2:
    """Three stages of 8 channels, 32 last features, cifar stem: the test variant."""
    return MobileNetV2(
        stem="cifar",
        width=0.25,
        settings=((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2)),
        last_features=32,
        **kwargs,
    )
