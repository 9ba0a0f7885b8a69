"""Logical axis names -> mesh PartitionSpecs and NamedShardings, driven by a rules table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, tuple[str, ...]], ...]
LogicalNames = Sequence[str | None]
T = TypeVar("T")
STAGE_AXIS = "stage"  # the mesh axis of pipeline stages (bigjax/stages.py)
CONTEXT_AXIS = "context"  # the mesh axis of context parallelism (bigjax/context.py)


def logical_to_spec(
    names: LogicalNames, rules: Rules, mesh_shape: dict[str, int], shape: Sequence[int]
) -> PartitionSpec:
    """Maps one array's logical axis names to a PartitionSpec.

    A mesh axis is used at most once per array (first dim wins), and a mesh axis whose size does
    not divide the dim is dropped for that dim: the array stays correct, only less sharded
    (e.g. 2 kv heads on a tensor axis of 4).
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape, strict=True):
        axes: list[str] = []
        for axis in table.get(name, ()) if name else ():
            size = mesh_shape.get(axis, 1)
            if axis in used or size == 1 or dim % (math.prod(mesh_shape[a] for a in axes) * size):
                continue
            axes.append(axis)
            used.add(axis)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


# What the mesh cuts: a batch into shards, the stacked layers into pipeline stages, a sequence
# into context parts. Each is asked of the rules for one dim, so a mesh axis that does not
# divide the dim cuts nothing, as in every array's spec.


def _axes(name: str, rules: Rules, mesh_shape: Mapping[str, int], dim: int) -> tuple[str, ...]:
    """The mesh axes a dim of logical name `name` and size `dim` is split over."""
    spec = logical_to_spec((name,), rules, dict(mesh_shape), (dim,))[0]
    return () if spec is None else (spec,) if isinstance(spec, str) else spec


def batch_shards(rules: Rules, mesh_shape: Mapping[str, int], rows: int) -> int:
    """How many shards a batch of `rows` is split into (the `act_batch` axes that divide it)."""
    return math.prod(mesh_shape[a] for a in _axes("act_batch", rules, mesh_shape, rows))


def num_stages(rules: Rules, mesh_shape: Mapping[str, int], num_layers: int) -> int:
    """Into how many pipeline stages `num_layers` stacked layers are split (1: no pipeline)."""
    cut = STAGE_AXIS in _axes("layers", rules, mesh_shape, num_layers)
    return mesh_shape[STAGE_AXIS] if cut else 1


def context_parts(rules: Rules, mesh_shape: Mapping[str, int], seq_len: int) -> int:
    """Into how many parts the context axis splits a sequence of `seq_len` (1: not split)."""
    cut = CONTEXT_AXIS in _axes("act_seq", rules, mesh_shape, seq_len)
    return mesh_shape[CONTEXT_AXIS] if cut else 1


def attention_specs(
    rules: Rules, mesh_shape: dict[str, int], batch: int, heads: int, kv_heads: int
) -> tuple[object, object, object]:
    """The mesh axes (PartitionSpec entries) of an attention's batch, query heads and KV
    heads. Where they differ a query group would be split across shards: then every head is
    on every shard."""
    batch_axes = logical_to_spec(("act_batch",), rules, mesh_shape, (batch,))[0]
    head_axes = logical_to_spec(("act_heads",), rules, mesh_shape, (heads,))[0]
    kv_head_axes = logical_to_spec(("act_kv_heads",), rules, mesh_shape, (kv_heads,))[0]
    if head_axes != kv_head_axes:
        return batch_axes, None, None
    return batch_axes, head_axes, kv_head_axes


def tree_specs(abstract_tree: nnx.State, mesh_shape: dict[str, int], rules: Rules) -> nnx.State:
    """PartitionSpecs for every leaf of an nnx State whose Variables carry `out_sharding`.

    Needs only the mesh's axis sizes, so plans can be made for meshes that do not exist here.
    """

    def one(variable: nnx.Variable) -> PartitionSpec:
        shape = variable.get_value().shape
        names = variable.get_metadata().get("out_sharding") or (None,) * len(shape)
        return logical_to_spec(names, rules, mesh_shape, shape)

    return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def tree_shardings(abstract_tree: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """NamedShardings for every leaf of an nnx State whose Variables carry `out_sharding`."""
    specs = tree_specs(abstract_tree, dict(mesh.shape), rules)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=is_spec)


def placed(abstract_tree: T, shardings: T) -> T:
    """ShapeDtypeStructs that carry their shardings: what lowering, compiling ahead of time
    and an Orbax restore (which reshards to them) need, without allocating an array."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
    )


def is_spec(x: object) -> bool:
    return isinstance(x, PartitionSpec)


def constrain(x: jax.Array, names: LogicalNames, rules: Rules) -> jax.Array:
    """Pins an activation's sharding by logical names, under the mesh set by `jax.set_mesh`.

    Outside a mesh context (e.g. a plain single-device forward pass) this is a no-op.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(names, rules, dict(mesh.shape), x.shape)
    return jax.lax.with_sharding_constraint(x, spec)


def mesh_sizes() -> dict[str, int]:
    """The axis sizes of the mesh being traced under (`jax.set_mesh`); {} outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return {} if mesh.empty else dict(mesh.shape)


def trace_platform() -> str:
    """The platform of the devices being traced for: the mesh's (TPU for a plan's
    compile-only topology on a CPU host), else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() if mesh.empty else mesh.abstract_device.platform
