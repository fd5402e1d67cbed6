"""AlexNet (Krizhevsky et al. 2012), torchvision's single-tower layout, with injected ops.

Five convs with bias (64, 192, 384, 256, 256 channels; 11x11 stride-4 stem), three 3x3 stride-2
max-pools, an adaptive average pool to 6x6, and a 4096-4096 classifier with dropout; no
normalization layers. 61.1M parameters at 1000 classes.

Any input size runs. The adaptive pool uses PyTorch's AdaptiveAvgPool2d bins (bin i covers
[floor(i H / 6), ceil((i + 1) H / 6)) ), so a map smaller than 6x6 is replicated up to it, and a
max-pool whose window does not fit the map (below 63x63 inputs with the 11x11 stride-4 stem) pads
it with -inf to the window, giving one output. torchvision refuses such inputs; at 224x224 (and
every size where torchvision runs) the two agree.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alijax.models.resnet import LayerOps


def _bins(size: int, out: int) -> np.ndarray:
    """[out, size] averaging matrix of PyTorch's adaptive pooling along one axis."""
    matrix = np.zeros((out, size), np.float32)
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """PyTorch's AdaptiveAvgPool2d: x [B, H, W, C] -> [B, size, size, C], any H, W >= 1."""
    height, width = x.shape[1:3]
    if height % size == 0 and width % size == 0:
        window = (height // size, width // size)
        return nn.avg_pool(x, window, strides=window)
    # Uneven or overlapping bins: contract with the fixed averaging matrices, in full precision.
    rows = jnp.asarray(_bins(height, size), x.dtype)
    cols = jnp.asarray(_bins(width, size), x.dtype)
    return jnp.einsum("bhwc,ih,jw->bijc", x, rows, cols, precision=jax.lax.Precision.HIGHEST)


def max_pool_fitting(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
    """VALID max-pool; a map smaller than the window is first padded with -inf to the window."""
    padding = [(0, max(0, window - d)) for d in x.shape[1:3]]
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=padding)


class AlexNet(nn.Module):
    """AlexNet classifier. Input: images [B, H, W, C] (NHWC); output: logits float32
    [B, num_classes]."""

    num_classes: int = 10
    features: Sequence[int] = (64, 192, 384, 256, 256)
    stem_kernel: int = 11
    stem_strides: int = 4
    stem_padding: int = 2
    pool_size: int = 6  # adaptive average pool output, per side
    hidden: Sequence[int] = (4096, 4096)
    dropout: float = 0.5
    ops: LayerOps = LayerOps()
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if len(self.features) != 5:
            raise ValueError(f"{self.features=} must name the 5 conv widths")
        conv = functools.partial(nn.Conv, dtype=self.dtype, **self.ops.conv_kwargs())
        dense = functools.partial(nn.Dense, dtype=self.dtype, **self.ops.dense_kwargs())
        edge = self.ops.edge()
        x = x.astype(self.dtype)
        x = nn.Conv(
            self.features[0],
            (self.stem_kernel, self.stem_kernel),
            strides=self.stem_strides,
            padding=self.stem_padding,
            dtype=self.dtype,
            name="conv1",
            **edge.conv_kwargs(),
        )(x)
        x = max_pool_fitting(nn.relu(x))
        x = max_pool_fitting(nn.relu(conv(self.features[1], (5, 5), padding=2, name="conv2")(x)))
        for index, features in enumerate(self.features[2:]):
            x = nn.relu(conv(features, (3, 3), padding=1, name=f"conv{index + 3}")(x))
        x = max_pool_fitting(x)
        x = adaptive_avg_pool(x, self.pool_size)
        x = x.reshape(x.shape[0], -1)
        for index, features in enumerate(self.hidden):
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
            x = nn.relu(dense(features, name=f"fc{index + 6}")(x))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head", **edge.dense_kwargs())(x)
        return logits.astype(jnp.float32)


def alexnet(**kwargs) -> AlexNet:
    """torchvision's AlexNet for 224x224 inputs (smaller ones run too; see the module docstring)."""
    return AlexNet(**kwargs)


def alexnet_tiny(**kwargs) -> AlexNet:
    """8-16 channels, 3x3 stride-1 stem, 2x2 pool, one 32-wide hidden layer: the test variant."""
    return AlexNet(
        features=(8, 16, 16, 16, 16),
        stem_kernel=3,
        stem_strides=1,
        stem_padding=1,
        pool_size=2,
        hidden=(32,),
        **kwargs,
    )
