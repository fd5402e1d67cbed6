"""Inception-v3 (Szegedy et al. 2016) in Flax linen, torchvision's layout, with injected ops.

Every conv is a BasicConv2d: conv without bias, BatchNorm (epsilon 1e-3), ReLU. For 299x299 inputs:
the stem (five convs, two max-pools) gives 35x35x192; three InceptionA blocks (Figure 5), the
grid reduction InceptionB, four InceptionC blocks with factorized 7x7 convs (Figure 6) on 17x17,
the reduction InceptionD, two InceptionE blocks with expanded 3x3 filter banks (Figure 7) on 8x8,
global average pool, dropout 0.5 and the classifier.

No auxiliary head by default (`aux_logits=False`): it only regularizes training (Section 4) and
is not used at inference. Without it the network has 23,834,568 parameters at 1000 classes;
`aux_logits=True` adds torchvision's InceptionAux on the 17x17 map (3,326,696 more: 27,161,264,
torchvision's count) and, in train mode only, returns (logits, aux_logits).

`stem="small"` replaces the stem by one stride-1 3x3 BasicConv2d (for 8x8 to 32x32 inputs) and
`width` scales every branch's channels: together they make the test variant.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from alijax.models.resnet import LayerOps, batch_norm


class BasicConv(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU, torchvision's BasicConv2d."""

    features: int
    kernel_size: tuple[int, int]
    conv: Callable
    norm: Callable
    strides: int = 1
    padding: Any = 0

    @nn.compact
    def __call__(self, x):
        x = self.conv(
            self.features, self.kernel_size, strides=self.strides, padding=self.padding, name="conv"
        )(x)
        return nn.relu(self.norm(name="bn")(x))


def _avg_pool_3x3(x):
    # PyTorch's avg_pool2d(3, stride=1, padding=1) counts the zero padding (count_include_pad).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=True)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
    """35x35: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (pool_features)."""

    pool_features: int
    block: Callable  # BasicConv with conv and norm bound
    ch: Callable  # scales a channel count by the width multiplier

    @nn.compact
    def __call__(self, x):
        b, ch = self.block, self.ch
        b1 = b(ch(64), (1, 1), name="branch1x1")(x)
        b5 = b(ch(48), (1, 1), name="branch5x5_1")(x)
        b5 = b(ch(64), (5, 5), padding=2, name="branch5x5_2")(b5)
        b3 = b(ch(64), (1, 1), name="branch3x3dbl_1")(x)
        b3 = b(ch(96), (3, 3), padding=1, name="branch3x3dbl_2")(b3)
        b3 = b(ch(96), (3, 3), padding=1, name="branch3x3dbl_3")(b3)
        bp = b(ch(self.pool_features), (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    block: Callable
    ch: Callable

    @nn.compact
    def __call__(self, x):
        b, ch = self.block, self.ch
        b3 = b(ch(384), (3, 3), strides=2, name="branch3x3")(x)
        bd = b(ch(64), (1, 1), name="branch3x3dbl_1")(x)
        bd = b(ch(96), (3, 3), padding=1, name="branch3x3dbl_2")(bd)
        bd = b(ch(96), (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """17x17 with 7x7 convs factorized into 1x7 and 7x1 (c7 channels inside the branches)."""

    c7: int
    block: Callable
    ch: Callable

    @nn.compact
    def __call__(self, x):
        b, ch, c7 = self.block, self.ch, self.ch(self.c7)
        row, col = ((0, 0), (3, 3)), ((3, 3), (0, 0))  # paddings of 1x7 and 7x1 convs
        b1 = b(ch(192), (1, 1), name="branch1x1")(x)
        b7 = b(c7, (1, 1), name="branch7x7_1")(x)
        b7 = b(c7, (1, 7), padding=row, name="branch7x7_2")(b7)
        b7 = b(ch(192), (7, 1), padding=col, name="branch7x7_3")(b7)
        bd = b(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = b(c7, (7, 1), padding=col, name="branch7x7dbl_2")(bd)
        bd = b(c7, (1, 7), padding=row, name="branch7x7dbl_3")(bd)
        bd = b(c7, (7, 1), padding=col, name="branch7x7dbl_4")(bd)
        bd = b(ch(192), (1, 7), padding=row, name="branch7x7dbl_5")(bd)
        bp = b(ch(192), (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    block: Callable
    ch: Callable

    @nn.compact
    def __call__(self, x):
        b, ch = self.block, self.ch
        b3 = b(ch(192), (1, 1), name="branch3x3_1")(x)
        b3 = b(ch(320), (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = b(ch(192), (1, 1), name="branch7x7x3_1")(x)
        b7 = b(ch(192), (1, 7), padding=((0, 0), (3, 3)), name="branch7x7x3_2")(b7)
        b7 = b(ch(192), (7, 1), padding=((3, 3), (0, 0)), name="branch7x7x3_3")(b7)
        b7 = b(ch(192), (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """8x8 with expanded filter banks: 3x3 outputs split into parallel 1x3 and 3x1 convs."""

    block: Callable
    ch: Callable

    @nn.compact
    def __call__(self, x):
        b, ch = self.block, self.ch
        row, col = ((0, 0), (1, 1)), ((1, 1), (0, 0))  # paddings of 1x3 and 3x1 convs
        b1 = b(ch(320), (1, 1), name="branch1x1")(x)
        b3 = b(ch(384), (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                b(ch(384), (1, 3), padding=row, name="branch3x3_2a")(b3),
                b(ch(384), (3, 1), padding=col, name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = b(ch(448), (1, 1), name="branch3x3dbl_1")(x)
        bd = b(ch(384), (3, 3), padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                b(ch(384), (1, 3), padding=row, name="branch3x3dbl_3a")(bd),
                b(ch(384), (3, 1), padding=col, name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        bp = b(ch(192), (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionAux(nn.Module):
    """torchvision's auxiliary classifier on the 17x17 map: avgpool 5/3, 1x1, 5x5, classifier."""

    num_classes: int
    block: Callable
    ch: Callable
    dense: Callable

    @nn.compact
    def __call__(self, x):
        x = nn.avg_pool(x, (5, 5), strides=(3, 3))
        x = self.block(self.ch(128), (1, 1), name="conv0")(x)
        x = self.block(self.ch(768), (5, 5), name="conv1")(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.dense(self.num_classes, name="fc")(x)


class InceptionV3(nn.Module):
    """Inception-v3 classifier. Input: images [B, H, W, C] (NHWC), 299x299 for the "imagenet"
    stem; output: logits float32 [B, num_classes] (train with aux_logits: a pair of them)."""

    num_classes: int = 10
    width: float = 1.0  # multiplies every conv's channels (at least 1)
    stem: str = "imagenet"  # "imagenet" (299x299 -> 35x35) | "small" (one stride-1 3x3 conv)
    a_pool_features: Sequence[int] = (32, 64, 64)  # one InceptionA block each (Mixed_5b-d)
    c_channels: Sequence[int] = (128, 160, 160, 192)  # one InceptionC block each (Mixed_6b-e)
    num_e: int = 2  # InceptionE blocks (Mixed_7b-c)
    aux_logits: bool = False
    dropout: float = 0.5
    ops: LayerOps = LayerOps()
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.stem not in ("imagenet", "small"):
            raise ValueError(f"{self.stem=} must be 'imagenet' or 'small'")
        norm = batch_norm(train, self.dtype, epsilon=1e-3)

        def conv_with(ops):
            return functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, **ops.conv_kwargs())

        def ch(features):
            return max(1, int(round(features * self.width)))

        edge = self.ops.edge()
        block = functools.partial(BasicConv, conv=conv_with(self.ops), norm=norm)
        stem_block = functools.partial(BasicConv, conv=conv_with(edge), norm=norm)
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = stem_block(ch(32), (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
            x = block(ch(32), (3, 3), name="Conv2d_2a_3x3")(x)
            x = block(ch(64), (3, 3), padding=1, name="Conv2d_2b_3x3")(x)
            x = _max_pool_3x3_s2(x)
            x = block(ch(80), (1, 1), name="Conv2d_3b_1x1")(x)
            x = block(ch(192), (3, 3), name="Conv2d_4a_3x3")(x)
            x = _max_pool_3x3_s2(x)
        else:
            x = stem_block(ch(192), (3, 3), padding=1, name="Conv2d_small")(x)
        for index, pool_features in enumerate(self.a_pool_features):
            x = InceptionA(pool_features, block, ch, name=f"Mixed_5{'bcdefgh'[index]}")(x)
        x = InceptionB(block, ch, name="Mixed_6a")(x)
        for index, c7 in enumerate(self.c_channels):
            x = InceptionC(c7, block, ch, name=f"Mixed_6{'bcdefgh'[index]}")(x)
        aux = None
        if self.aux_logits:
            dense = functools.partial(nn.Dense, dtype=self.dtype, **edge.dense_kwargs())
            aux = InceptionAux(self.num_classes, block, ch, dense, name="AuxLogits")(x)
        x = InceptionD(block, ch, name="Mixed_7a")(x)
        for index in range(self.num_e):
            x = InceptionE(block, ch, name=f"Mixed_7{'bcdefgh'[index]}")(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc", **edge.dense_kwargs())(x)
        logits = logits.astype(jnp.float32)
        if train and aux is not None:
            return logits, aux.astype(jnp.float32)
        return logits


def inception_v3(**kwargs) -> InceptionV3:
    """Inception-v3 for 299x299 inputs, without the auxiliary head unless aux_logits=True."""
    return InceptionV3(**kwargs)


def inception_tiny(**kwargs) -> InceptionV3:
    """One block of each kind at 1/16 width after a one-conv stem, for 8x8 to 32x32 inputs."""
    return InceptionV3(
        width=1 / 16,
        stem="small",
        a_pool_features=(32,),
        c_channels=(128,),
        num_e=1,
        **kwargs,
    )
