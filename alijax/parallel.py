"""Meshes, multi-host start-up and batch sharding.

Every sharded piece of alijax runs on a `Mesh` with the named axes `data` (batch parallelism) and
`model` (class-sharded heads, sharded indexes). The same code runs on one CPU, on 8 simulated CPU
devices, on one GPU and on many hosts after `maybe_initialize_distributed()`.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"
AXIS_NAMES = (DATA_AXIS, MODEL_AXIS)

# Environment variables that name a coordinator. `jax.distributed.initialize()` also discovers
# SLURM, Open MPI and Cloud TPU set-ups on its own; these let any launcher start a job by hand.
_COORDINATOR_ENV = "ALIJAX_COORDINATOR"
_NUM_PROCESSES_ENV = "ALIJAX_NUM_PROCESSES"
_PROCESS_ID_ENV = "ALIJAX_PROCESS_ID"


def maybe_initialize_distributed() -> bool:
    """Starts multi-host JAX when the environment names a coordinator; returns whether it did.

    Run the same command on every host with ALIJAX_COORDINATOR=host:port,
    ALIJAX_NUM_PROCESSES=<hosts> and ALIJAX_PROCESS_ID=<rank> (or under SLURM / Open MPI, where
    jax finds these itself when ALIJAX_COORDINATOR=auto).
    """
    coordinator = os.environ.get(_COORDINATOR_ENV)
    if not coordinator:
        return False
    if coordinator == "auto":
        jax.distributed.initialize()
        return True
    try:
        num_processes = int(os.environ[_NUM_PROCESSES_ENV])
        process_id = int(os.environ[_PROCESS_ID_ENV])
    except KeyError as err:
        raise ValueError(
            f"{_COORDINATOR_ENV}={coordinator!r} is set, so {err.args[0]} must be set too"
        ) from None
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    return True


def run_local_processes(
    command: Sequence[str], num_processes: int, devices_per_process: int, timeout: float
) -> list[tuple[int, str]]:
    """Runs `command` as the num_processes processes of one multi-host job on this machine:
    each gets devices_per_process simulated CPU devices and, when there are several, the
    ALIJAX_* variables that maybe_initialize_distributed reads (a coordinator on a free local
    port), so their collectives cross process boundaries as between hosts. For tests and
    benchmarks of multi-host code on one machine. Returns each process's (exit status, output:
    stdout and stderr together), in rank order."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(num_processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
        if num_processes > 1:
            env[_COORDINATOR_ENV] = f"localhost:{port}"
            env[_NUM_PROCESSES_ENV] = str(num_processes)
            env[_PROCESS_ID_ENV] = str(rank)
        procs.append(
            subprocess.Popen(
                list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    try:
        outputs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
    finally:
        for p in procs:  # one that failed leaves the others waiting on its collectives
            p.kill()
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


def make_mesh(
    shape: Sequence[int] | None = None,
    axis_names: Sequence[str] = AXIS_NAMES,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh over `devices` (default: all devices) with named axes.

    shape: sizes per axis; None puts every device on the first axis (pure data parallelism).
    One entry may be -1 and is inferred. Axes are `AxisType.Auto`, so arrays that carry no
    sharding still enter `jit` and `shard_map` as replicated values.
    """
    devices = list(jax.devices() if devices is None else devices)
    if shape is None:
        shape = (len(devices),) + (1,) * (len(axis_names) - 1)
    shape = _infer_axis(tuple(shape), len(devices))
    if len(shape) != len(axis_names):
        raise ValueError(f"{shape=} must have one size per name in {tuple(axis_names)=}")
    if math.prod(shape) != len(devices):
        raise ValueError(f"{shape=} needs {math.prod(shape)} devices but {len(devices)} are given")
    device_grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(device_grid, tuple(axis_names), axis_types=(AxisType.Auto,) * len(axis_names))


def _infer_axis(shape: tuple[int, ...], num_devices: int) -> tuple[int, ...]:
    if shape.count(-1) > 1:
        raise ValueError(f"{shape=} may hold at most one -1")
    if -1 not in shape:
        return shape
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
        raise ValueError(f"{shape=} does not divide {num_devices=}")
    return tuple(num_devices // known if s == -1 else s for s in shape)


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device (parameters, optimizer state)."""
    return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) dimension over the `data` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(batch, mesh: Mesh):
    """Places a host batch (pytree of arrays [B, ...]) on the mesh, split over `data`.

    On many hosts each process passes its own slice of the global batch, and the global array is
    assembled from the process-local pieces.
    """
    sharding = data_sharding(mesh)
    data_size = mesh.shape[DATA_AXIS]

    def place(x):
        x = np.asarray(x)
        if jax.process_count() == 1:
            if x.shape[0] % data_size:
                raise ValueError(
                    f"batch dimension {x.shape[0]} must be a multiple of the mesh's "
                    f"{DATA_AXIS!r} axis size {data_size}"
                )
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(place, batch)
