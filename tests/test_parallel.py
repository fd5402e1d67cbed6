import jax
import numpy as np
import pytest

from alijax import parallel


def test_make_mesh_default_puts_all_devices_on_data():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data", "model")
    assert mesh.shape == {"data": 8, "model": 1}


def test_make_mesh_infers_one_axis():
    mesh = parallel.make_mesh((2, -1))
    assert mesh.shape == {"data": 2, "model": 4}


@pytest.mark.parametrize(
    "shape, message",
    [((3, 4), "needs 12 devices"), ((-1, -1), "at most one"), ((3, -1), "does not divide")],
)
def test_make_mesh_rejects_bad_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(shape)


def test_shard_batch_splits_over_data_axis():
    mesh = parallel.make_mesh((2, 4))
    batch = {"x": np.arange(16, dtype=np.float32).reshape(8, 2)}
    sharded = parallel.shard_batch(batch, mesh)["x"]
    np.testing.assert_array_equal(np.asarray(sharded), batch["x"])
    # Each data shard holds half of the batch; the 4 model devices of a shard hold copies.
    shard_rows = {tuple(np.asarray(s.data)[:, 0]) for s in sharded.addressable_shards}
    assert shard_rows == {(0.0, 2.0, 4.0, 6.0), (8.0, 10.0, 12.0, 14.0)}


def test_shard_batch_rejects_indivisible_batch():
    mesh = parallel.make_mesh((8, 1))
    with pytest.raises(ValueError, match="multiple of the mesh's 'data' axis size 8"):
        parallel.shard_batch({"x": np.zeros((12, 2))}, mesh)


def test_unsharded_inputs_enter_shard_map():
    mesh = parallel.make_mesh((2, 4))
    f = jax.shard_map(
        lambda x: x * 2,
        mesh=mesh,
        in_specs=jax.sharding.PartitionSpec(),
        out_specs=jax.sharding.PartitionSpec(),
    )
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(np.ones(4))), 2 * np.ones(4))


def test_no_coordinator_means_no_distributed_start(monkeypatch):
    monkeypatch.delenv("ALIJAX_COORDINATOR", raising=False)
    assert parallel.maybe_initialize_distributed() is False


def test_coordinator_without_process_count_is_an_error(monkeypatch):
    monkeypatch.setenv("ALIJAX_COORDINATOR", "localhost:1234")
    monkeypatch.delenv("ALIJAX_NUM_PROCESSES", raising=False)
    with pytest.raises(ValueError, match="ALIJAX_NUM_PROCESSES"):
        parallel.maybe_initialize_distributed()
