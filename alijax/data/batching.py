"""Batch iterators that are pure functions of (seed, step).

The order of examples is decided by `epoch_permutation(seed, epoch)` alone, so a run resumed at
step s sees exactly the batches an uninterrupted run sees from step s on: no iterator state needs
to be checkpointed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import jax
import numpy as np

from alijax import parallel


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of the examples in one epoch: int64 [num_examples]."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    if batch_size < 1 or batch_size > num_examples:
        raise ValueError(f"{batch_size=} must lie in [1, {num_examples=}]")
    return num_examples // batch_size  # the remainder is dropped, reshuffled into later epochs


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the global batch at `step`: int64 [batch_size]."""
    per_epoch = steps_per_epoch(num_examples, batch_size)
    epoch, position = divmod(step, per_epoch)
    order = epoch_permutation(num_examples, seed, epoch)
    return order[position * batch_size : (position + 1) * batch_size]


def _num_examples(arrays: Mapping[str, np.ndarray]) -> int:
    sizes = {name: len(a) for name, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"arrays must share their leading size, got {sizes}")
    return next(iter(sizes.values()))


def _process_slice(indices: np.ndarray) -> np.ndarray:
    """This host's contiguous part of a global batch (all of it on one host)."""
    count = jax.process_count()
    if len(indices) % count:
        raise ValueError(f"global batch size {len(indices)} must be a multiple of {count} hosts")
    local = len(indices) // count
    start = jax.process_index() * local
    return indices[start : start + local]


def train_batches(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    seed: int,
    start_step: int = 0,
    mesh=None,
) -> Iterator[tuple[int, dict]]:
    """Yields (step, batch) forever from `start_step`, shuffled per epoch by seed.

    batch: {name: array [batch_size, ...]}, split over the mesh's `data` axis when a mesh is given.
    """
    num_examples = _num_examples(arrays)
    per_epoch = steps_per_epoch(num_examples, batch_size)
    step = start_step
    cached_epoch, order = None, None
    while True:
        epoch, position = divmod(step, per_epoch)
        if epoch != cached_epoch:
            cached_epoch, order = epoch, epoch_permutation(num_examples, seed, epoch)
        indices = _process_slice(order[position * batch_size : (position + 1) * batch_size])
        batch = {name: a[indices] for name, a in arrays.items()}
        yield step, (parallel.shard_batch(batch, mesh) if mesh is not None else batch)
        step += 1


def eval_batches(arrays: Mapping[str, np.ndarray], batch_size: int, mesh=None) -> Iterator[dict]:
    """Yields every example once, in order, in batches padded to `batch_size`.

    Each batch carries "mask" float32 [batch_size]: 1 for real examples, 0 for padding, so that
    metrics summed with the mask count every example exactly once.
    """
    num_examples = _num_examples(arrays)
    for start in range(0, num_examples, batch_size):
        stop = min(start + batch_size, num_examples)
        pad = batch_size - (stop - start)
        batch = {
            name: np.concatenate([a[start:stop], np.zeros((pad,) + a.shape[1:], a.dtype)])
            for name, a in arrays.items()
        }
        batch["mask"] = np.concatenate(
            [np.ones(stop - start, np.float32), np.zeros(pad, np.float32)]
        )
        if jax.process_count() > 1:
            local = _process_slice(np.arange(batch_size))
            batch = {name: a[local] for name, a in batch.items()}
        yield parallel.shard_batch(batch, mesh) if mesh is not None else batch
