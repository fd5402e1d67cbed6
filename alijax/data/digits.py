"""scikit-learn's 8x8 handwritten digits: real data that ships in a package (1797 images, 10 classes)."""

from __future__ import annotations

import numpy as np


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> dict[str, dict[str, np.ndarray]]:
    """Deterministic stratified train/test split of the digits.

    Returns {"train": {"image", "label"}, "test": {...}} with images float32 [N, 8, 8, 1] in [0, 1]
    (NHWC) and labels int32 [N]. The same seed gives the same split on every machine.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"{test_fraction=} must lie in (0, 1)")
    digits = sk_load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[..., None]
    labels = digits.target.astype(np.int32)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    split = lambda idx: {"image": images[idx], "label": labels[idx]}  # noqa: E731
    return {"train": split(train_idx), "test": split(test_idx)}
