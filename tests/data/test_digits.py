import numpy as np
import pytest

from alijax.data import load_digits


def test_digits_split_is_deterministic_stratified_and_disjoint():
    first, second = load_digits(seed=0), load_digits(seed=0)
    np.testing.assert_array_equal(first["test"]["label"], second["test"]["label"])
    train, test = first["train"], first["test"]
    assert train["image"].shape == (1437, 8, 8, 1) and test["image"].shape == (360, 8, 8, 1)
    assert (
        train["image"].dtype == np.float32
        and 0.0 <= train["image"].min()
        and train["image"].max() <= 1.0
    )
    # Stratified: every class holds 20% +- 1 example of its digits in the test split.
    counts = np.bincount(test["label"], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    train_rows = {row.tobytes() for row in train["image"]}
    overlap = sum(row.tobytes() in train_rows for row in test["image"])
    assert overlap < 5  # the raw digits data hold a handful of exact duplicates, no more


def test_other_seed_gives_other_split():
    assert not np.array_equal(
        load_digits(seed=0)["test"]["label"], load_digits(seed=1)["test"]["label"]
    )


def test_bad_test_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.5)
