"""CIFAR-10 and CIFAR-100 in the official binary version (https://www.cs.toronto.edu/~kriz/cifar.html).

A file is a sequence of fixed-size records with no header: the label byte(s), then 3072 pixel bytes
as three 32x32 planes (R, then G, then B), each row-major. CIFAR-10 has one label byte
(data_batch_1.bin ... data_batch_5.bin, test_batch.bin in `cifar-10-batches-bin`); CIFAR-100 has
two, coarse then fine (train.bin, test.bin in `cifar-100-binary`).
"""

from __future__ import annotations

import os

import numpy as np

from alijax.data.files import FormatError, atomic_write

IMAGE_SHAPE = (32, 32, 3)
_PIXEL_BYTES = 3 * 32 * 32

_CIFAR10 = {
    "name": "CIFAR-10",
    "folder": "cifar-10-batches-bin",
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
    "num_classes": (10,),
}
# Label columns in file order: coarse (20 superclasses), then fine (100 classes).
_CIFAR100 = {
    "name": "CIFAR-100",
    "folder": "cifar-100-binary",
    "train": ("train.bin",),
    "test": ("test.bin",),
    "num_classes": (20, 100),
}


def load_cifar10(root: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 images uint8 [N, 32, 32, 3] (NHWC, RGB) and labels int32 [N] in [0, 10).

    `root` is the `cifar-10-batches-bin` folder or its parent. The train split is the five data
    batches in order (N = 50000), the test split is test_batch.bin (N = 10000).
    """
    images, labels = _load(root, split, _CIFAR10)
    return images, labels[:, 0]


def load_cifar100(
    root: str | os.PathLike, split: str = "train", label: str = "fine"
) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-100 images uint8 [N, 32, 32, 3] (NHWC, RGB) and labels int32 [N].

    `label="fine"` gives the 100 classes, `label="coarse"` the 20 superclasses. `root` is the
    `cifar-100-binary` folder or its parent; train.bin has N = 50000, test.bin N = 10000.
    """
    columns = {"coarse": 0, "fine": 1}
    if label not in columns:
        raise ValueError(f"{label=} must be 'fine' or 'coarse'")
    images, labels = _load(root, split, _CIFAR100)
    return images, labels[:, columns[label]]


def write_cifar10(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> None:
    """Writes one CIFAR-10 binary file: images uint8 [N, 32, 32, 3], labels integer [N] in [0, 10)."""
    _write(path, images, {"labels": labels}, _CIFAR10)


def write_cifar100(
    path: str | os.PathLike, images: np.ndarray, coarse_labels: np.ndarray, fine_labels: np.ndarray
) -> None:
    """Writes one CIFAR-100 binary file: images uint8 [N, 32, 32, 3], coarse labels [N] in [0, 20),
    fine labels [N] in [0, 100)."""
    _write(path, images, {"coarse_labels": coarse_labels, "fine_labels": fine_labels}, _CIFAR100)


def _load(root, split: str, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    if split not in ("train", "test"):
        raise ValueError(f"{split=} must be 'train' or 'test'")
    folder = _batches_folder(root, spec["folder"])
    parts = [_read_file(_expect_file(folder, name, spec), spec) for name in spec[split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return images, labels


def _batches_folder(root, folder_name: str) -> str:
    root = os.fspath(root)
    nested = os.path.join(root, folder_name)
    return nested if os.path.isdir(nested) else root


def _expect_file(folder: str, name: str, spec: dict) -> str:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        files = ", ".join(spec["train"] + spec["test"])
        raise FileNotFoundError(
            f"{path} not found: {spec['name']} (binary version) expects {files} in "
            f"{spec['folder']}/ or in the folder given as root"
        )
    return path


def _read_file(path: str, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """One binary file -> images uint8 [N, 32, 32, 3], labels int32 [N, label_bytes]."""
    label_bytes = len(spec["num_classes"])
    record = label_bytes + _PIXEL_BYTES
    size = os.path.getsize(path)
    if size == 0 or size % record:
        raise FormatError(
            f"{path}: file size {size} bytes is not a positive multiple of the {spec['name']} "
            f"record size {record} bytes ({label_bytes} label byte(s) + {_PIXEL_BYTES} pixel bytes); "
            "truncated file, or not the binary version?"
        )
    records = np.fromfile(path, dtype=np.uint8).reshape(-1, record)
    labels = records[:, :label_bytes].astype(np.int32)
    for column, num_classes in enumerate(spec["num_classes"]):
        bad = np.flatnonzero(labels[:, column] >= num_classes)
        if bad.size:
            raise FormatError(
                f"{path}: record {bad[0]} has label {labels[bad[0], column]} in label byte {column}, "
                f"expected < {num_classes} for {spec['name']}; is this file from the other dataset?"
            )
    planes = records[:, label_bytes:].reshape(-1, 3, 32, 32)
    return np.ascontiguousarray(planes.transpose(0, 2, 3, 1)), labels


def _write(path, images, labels: dict[str, np.ndarray], spec: dict) -> None:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"{images.dtype=} must be uint8")
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"{images.shape=} must be [N, 32, 32, 3] (NHWC)")
    n = images.shape[0]
    columns = []
    for (name, values), num_classes in zip(labels.items(), spec["num_classes"]):
        values = np.asarray(values)
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{name}.dtype={values.dtype} must be an integer type")
        if values.shape != (n,):
            raise ValueError(f"{name}.shape={values.shape} must be ({n},), one label per image")
        if n and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"{name} must lie in [0, {num_classes}), found [{values.min()}, {values.max()}]"
            )
        columns.append(values.astype(np.uint8))
    planes = images.transpose(0, 3, 1, 2).reshape(n, _PIXEL_BYTES)
    records = np.concatenate([np.stack(columns, axis=1), planes], axis=1)
    with atomic_write(path) as f:
        f.write(records.tobytes())
