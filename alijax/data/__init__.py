"""Data: real-format readers and deterministic, shardable batch iterators.

`load_dataset(cfg, seed)` gives {"train": {"image", "label"}, "test": {...}} with float32 NHWC
images, for the image-classification configs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from alijax.data.batching import batch_indices, epoch_permutation, eval_batches, train_batches
from alijax.data.digits import load_digits
from alijax.data.files import FormatError, atomic_write

DATASETS = ("digits", "cifar10", "cifar100")


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images to float32, centred and scaled per channel by the training set's statistics."""
    train = train.astype(np.float32) / 255.0
    test = test.astype(np.float32) / 255.0
    mean = train.mean(axis=(0, 1, 2))
    std = train.std(axis=(0, 1, 2)) + 1e-6
    return (train - mean) / std, (test - mean) / std


def load_dataset(cfg: Mapping, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """The train and test splits named by cfg["name"] (digits | cifar10 | cifar100)."""
    name = cfg["name"]
    if name == "digits":
        return load_digits(seed=seed, test_fraction=cfg.get("test_fraction", 0.2))
    if name in ("cifar10", "cifar100"):
        from alijax.data import cifar

        root = cfg.get("root") or ""
        if not root:
            raise ValueError(f"dataset {name!r} needs dataset.root: the folder of the binary files")
        loader = cifar.load_cifar10 if name == "cifar10" else cifar.load_cifar100
        (train_x, train_y), (test_x, test_y) = loader(root, "train"), loader(root, "test")
        train_x, test_x = _standardize(train_x, test_x)
        return {
            "train": {"image": train_x, "label": train_y.astype(np.int32)},
            "test": {"image": test_x, "label": test_y.astype(np.int32)},
        }
    raise ValueError(f"dataset {name=} must be one of {DATASETS}")


__all__ = [
    "DATASETS",
    "FormatError",
    "atomic_write",
    "batch_indices",
    "epoch_permutation",
    "eval_batches",
    "load_dataset",
    "load_digits",
    "train_batches",
]
