"""Distributed start-up, the device mesh, shardings and host -> global array helpers.

A leaf module: it imports nothing else of ours. The mesh has two axes: `data` (pure data parallel) and `fsdp`
(data parallel too, but parameters and optimizer state are sharded over it when configured). A batch is split
over both axes together.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
    """Call `jax.distributed.initialize` when launched as several processes; do nothing otherwise.

    Sources, in order: the arguments, then the environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
    `JAX_PROCESS_ID`), then cluster auto-detection (Cloud TPU pods, SLURM) when `UVIT_DISTRIBUTED=1`.
    Returns True when `jax.distributed` was initialised.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator_address and num_processes and num_processes > 1:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif os.environ.get("UVIT_DISTRIBUTED") == "1":
        jax.distributed.initialize()  # TPU pod / SLURM: JAX finds the coordinator itself.
    else:
        return False
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def make_mesh(fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all devices of all processes; real or a TPU topology's).

    Within a slice, `mesh_utils.create_device_mesh` lays the fsdp axis (the most talkative) along the ICI torus;
    across slices (devices with several `slice_index`es), `create_hybrid_device_mesh` puts `data` over DCN and keeps
    each fsdp group inside one slice, so only the gradient all-reduce crosses slices."""
    devices = list(jax.devices() if devices is None else devices)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    per_slice = len(devices) // slices
    if fsdp < 1 or per_slice % fsdp:
        raise ValueError(f"mesh: fsdp={fsdp} must be >= 1 and divide the {per_slice} devices of a slice")
    if slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh((per_slice // fsdp, fsdp), (slices, 1), devices,
                                                    allow_split_physical_axes=True)
    else:
        grid = mesh_utils.create_device_mesh((per_slice // fsdp, fsdp), devices, allow_split_physical_axes=True)
    return Mesh(grid, DATA_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over every device of the mesh."""
    return NamedSharding(mesh, P(DATA_AXES))


def activation_sharding(mesh: Mesh | None) -> NamedSharding | None:
    """The FSDP rule for activations: when `mesh` shards parameters (fsdp > 1), every Linear's output keeps its
    leading (batch) axis split over all devices; None (no constraint) otherwise. An argument of the network's
    apply function (`models.make_apply`), built once with the mesh.

    Needed with FSDP: a Linear's input is split over `fsdp` by batch and its kernel over `fsdp` by features, and
    left alone XLA's partitioner often all-gathers the activations (8x the batch on every device) instead of the
    kernel: U-ViT-L/2 at batch 128 per device on 8 devices, 10.0 GiB per device against 8.3 GiB pinned."""
    if mesh is None or mesh.shape["fsdp"] == 1:
        return None
    return batch_sharding(mesh)


def param_sharding(shape: tuple[int, ...], mesh: Mesh, min_size: int = 2 ** 16) -> NamedSharding:
    """FSDP rule: shard the largest axis divisible by the fsdp size; small or indivisible arrays stay replicated."""
    n = mesh.shape["fsdp"]
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return replicated(mesh)
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def tree_param_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
    """`param_sharding` for every leaf of a tree of arrays / ShapeDtypeStructs (scalars replicated)."""
    return jax.tree.map(lambda x: param_sharding(tuple(x.shape), mesh), abstract_tree)


def host_local_to_global(tree: Any, mesh: Mesh) -> Any:
    """Per-process numpy batches (leading axis = this process's share) -> global jax.Arrays split over the mesh."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def is_main_process() -> bool:
    return jax.process_index() == 0


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `abstract_tree` carrying `shardings` (e.g. an orbax restore target on this mesh)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def padded_size(n: int) -> int:
    """The smallest batch >= n that splits evenly over all devices."""
    d = jax.device_count()
    return -(-int(n) // d) * d


def gather_to_host(x) -> np.ndarray:
    """A global (possibly multi-process) array as one numpy array on every host."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class DeviceCountError(RuntimeError):
    """The run sees another number of devices than its launch asked for."""


def check_device_count(expected: int) -> None:
    """Stop with both numbers when the run sees another device count than the launch asked for (0: no check)."""
    if expected and jax.device_count() != expected:
        raise DeviceCountError(f"this run sees {jax.device_count()} devices ({jax.process_count()} processes x "
                           f"{jax.local_device_count()} local) but the launch expected {expected} "
                           "(config.mesh.expect_devices): check the launch's node/GPU counts")
