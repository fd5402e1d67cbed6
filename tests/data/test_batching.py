import numpy as np
import pytest

from alijax import parallel
from alijax.data import batching


def _arrays(n=50):
    return {"image": np.arange(n, dtype=np.float32)[:, None], "label": np.arange(n, dtype=np.int32)}


def test_each_epoch_visits_every_full_batch_once():
    seen = [batching.batch_indices(50, 10, seed=3, step=s) for s in range(5)]
    assert sorted(np.concatenate(seen).tolist()) == list(range(50))


def test_epochs_are_shuffled_differently_and_reproducibly():
    assert not np.array_equal(
        batching.epoch_permutation(50, 0, 0), batching.epoch_permutation(50, 0, 1)
    )
    np.testing.assert_array_equal(
        batching.epoch_permutation(50, 7, 2), batching.epoch_permutation(50, 7, 2)
    )


def test_resumed_iterator_matches_uninterrupted_one():
    full = batching.train_batches(_arrays(), 8, seed=1)
    reference = [next(full) for _ in range(20)]
    resumed = batching.train_batches(_arrays(), 8, seed=1, start_step=13)
    for step, batch in (next(resumed) for _ in range(7)):
        ref_step, ref_batch = reference[step]
        assert ref_step == step
        np.testing.assert_array_equal(batch["label"], ref_batch["label"])


def test_train_batches_are_sharded_over_data():
    mesh = parallel.make_mesh((8, 1))
    _, batch = next(batching.train_batches(_arrays(), 16, seed=0, mesh=mesh))
    assert len(batch["image"].addressable_shards) == 8
    assert batch["image"].addressable_shards[0].data.shape == (2, 1)


def test_eval_batches_cover_every_example_once_with_mask():
    batches = list(batching.eval_batches(_arrays(23), 8))
    assert [b["image"].shape[0] for b in batches] == [8, 8, 8]
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    np.testing.assert_array_equal(labels, np.arange(23))
    assert batches[-1]["mask"].sum() == 7


def test_bad_batch_size_is_refused():
    with pytest.raises(ValueError, match="batch_size=0"):
        batching.batch_indices(10, 0, 0, 0)
    with pytest.raises(ValueError, match="leading size"):
        next(batching.train_batches({"a": np.zeros(4), "b": np.zeros(5)}, 2, 0))
