"""The device mesh and how a train state is laid out on it (shared by the MoCo and MVLM trainers).

Mesh axes are always ('data', 'fsdp', 'model'), sized from `config.mesh` (-1 = the remaining devices):

    data    pure data parallelism: the batch is split, the state replicated
    fsdp    the batch is split AND large weights are split (ZeRO-3 / FSDP): gathered per layer by XLA
    model   tensor parallelism for the transformer's mlp/heads/vocab dimensions; stays inside a host

Parameters carry logical axis names (`nnx.with_partitioning(init, ('embed', 'mlp'))`); `RULES` map
them to mesh axes. A parameter smaller than `min_size` elements (biases, norms) is replicated, and
so is a dimension its mesh axis does not divide (logged). Optimizer states mirror the parameters
(optax maps over the nnx Variables, which keep their metadata), so they are laid out the same way.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

# Logical axis name -> mesh axis (or axes, or None = replicated). 'batch' is for activations/inputs.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("kv", None),
    ("patch", None),
)
MIN_SHARD_SIZE = 2**14  # elements; smaller parameters (biases, norm scales) stay replicated


# ----------------------------------------------------------------------------------------------
# The mesh


def mesh_shape(spec: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, model) from a config section like {data: -1, fsdp: 1, model: 1}; at most one -1."""
    unknown = set(spec) - set(AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; the axes are {AXES}")
    sizes = [int(spec.get(a, 1)) for a in AXES]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh={dict(zip(AXES, sizes))}: each axis is a positive size, at most one is -1")
    fixed = math.prod(s for s in sizes if s > 0)
    if free:
        if num_devices % fixed:
            raise ValueError(f"config.mesh={dict(zip(AXES, sizes))}: {num_devices} devices are not divisible by "
                             f"the fixed axes' product {fixed}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh={dict(zip(AXES, sizes))} has {math.prod(sizes)} devices but "
                         f"{num_devices} are visible; make the product equal, or set one axis to -1")
    return tuple(sizes)


def _dcn_split(shape: Sequence[int], num_processes: int, local_devices: int) -> tuple[tuple, tuple]:
    """Split (data, fsdp, model) into per-process (ICI) x across-process (DCN) factors.

    Processes go over `data` first, then `fsdp`; `model` must fit inside one process's devices.
    """
    data, fsdp, model = shape
    if local_devices % model:
        raise ValueError(f"mesh axis model={model} must divide the {local_devices} devices of one process "
                         "(tensor parallelism stays inside a host)")
    dcn_data = math.gcd(data, num_processes)
    dcn_fsdp = num_processes // dcn_data
    if fsdp % dcn_fsdp:
        raise ValueError(f"mesh (data={data}, fsdp={fsdp}, model={model}) cannot be spread over {num_processes} "
                         "processes: data x fsdp must be a multiple of the process count")
    return (data // dcn_data, fsdp // dcn_fsdp, model), (dcn_data, dcn_fsdp, 1)


def make_mesh(spec: Mapping[str, int], devices: Sequence | None = None) -> jax.sharding.Mesh:
    """The ('data', 'fsdp', 'model') mesh for `config.mesh` over all (or the given) devices.

    One process (or one TPU slice): `jax.make_mesh`, which orders devices by the physical topology.
    Several processes without slices (GPU nodes, CPU hosts) or several TPU slices: a hybrid mesh, so
    `data` (then `fsdp`) crosses the slow network and `model` never does.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(spec, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * 3  # XLA propagates shardings through the model
    slices = {getattr(d, "slice_index", 0) for d in devices}
    processes = {d.process_index for d in devices}
    if len(slices) > 1:
        granules = len(slices)
        process_is_granule = False
    elif len(processes) > 1 and devices[0].platform != "tpu":
        granules = len(processes)
        process_is_granule = True
    else:
        return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
    from jax.experimental import mesh_utils

    ici, dcn = _dcn_split(shape, granules, len(devices) // granules)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=process_is_granule)
    return jax.sharding.Mesh(grid, AXES, axis_types=auto)


def batch_axes(mesh) -> tuple[str, ...]:
    """The batch axes ('data', 'fsdp') that `mesh` has (a test or tool may build a 1-D data mesh)."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_shards(mesh) -> int:
    """How many parts the batch is split into: the product of the mesh's batch axes."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_spec() -> P:
    return P(BATCH_AXES)


def num_batch_shards(mesh) -> int:
    """How many ways the batch is split: the product of the mesh's batch axes (data x fsdp)."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_size_per_shard(global_batch: int, mesh) -> int:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % n:
        raise ValueError(f"batch_size {global_batch} is not divisible by the {n} batch shards of the mesh "
                         f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
    return global_batch // n


# ----------------------------------------------------------------------------------------------
# Logical axis names -> PartitionSpecs -> NamedShardings


def logical_to_spec(names: Iterable[str | None] | None, shape: Sequence[int], mesh, rules=RULES, *,
                    min_size: int = MIN_SHARD_SIZE, what: str = "") -> P:
    """The PartitionSpec of an array of `shape` whose dimensions are named `names`."""
    if not names or math.prod(shape) < min_size:
        return P()
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(f"{what or 'parameter'}: {len(names)} axis names {names} for shape {tuple(shape)}")
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(names, shape):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1 and a not in used)  # size-1 axes are no-ops
        size = math.prod(mesh.shape[a] for a in axes)
        if axes and dim % size:
            logging.info("%s: dim %r of size %d is not divisible by mesh axes %s (%d); replicated",
                         what or "parameter", name, dim, axes, size)
            axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_sharding(abstract_state, mesh, rules=RULES, *, min_size: int = MIN_SHARD_SIZE):
    """NamedShardings for every array of `abstract_state` (same tree structure, leaves = shardings).

    nnx Variables (parameters, and optimizer states mirroring them) are sharded by their
    `out_sharding` logical names through `rules`; everything else (step, RNG, batch statistics of
    unannotated modules, ...) is replicated. Override single fields afterwards (e.g. the MoCo queue).
    """
    def variable_sharding(path, v):
        if not _is_variable(v):
            return NamedSharding(mesh, P())
        names = v.get_metadata().get("out_sharding")
        shape = getattr(v, "shape", None) or jax.tree.leaves(v)[0].shape
        return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules, min_size=min_size,
                                                   what=jax.tree_util.keystr(path)))

    prefix = jax.tree_util.tree_map_with_path(variable_sharding, abstract_state, is_leaf=_is_variable)
    # Broadcast each Variable's sharding over its (single-array) subtree: same structure as the state.
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), prefix, abstract_state)


def sharded_along_first(abstract_tree, mesh, axis: str | tuple[str, ...] = "data"):
    """Shard every array of rank >= 1 along its first dimension over `axis` (one mesh axis or several;
    replicated if it does not divide); scalars replicated. For the MoCo queue: keys (K, D) and
    metadata (K,) split along K."""
    axes = (axis,) if isinstance(axis, str) else tuple(axis)
    size = math.prod(mesh.shape[a] for a in axes)

    def one(x):
        shape = x.shape
        if not shape or shape[0] % size:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]))

    return jax.tree.map(one, abstract_tree)


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (what Orbax restores into: resharding on load)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def describe(mesh) -> str:
    devices = np.asarray(mesh.devices)
    return (f"mesh {dict(mesh.shape)} over {devices.size} device(s) of {len({d.process_index for d in devices.flat})} "
            f"process(es)")
