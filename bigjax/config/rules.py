"""The sharding vocabulary: mesh axes, the layers' logical axes, and the default rules."""

from __future__ import annotations

# Mesh axes, outermost (slowest, DCN-friendly) first: data parallel, pipeline stages, FSDP,
# context (the sequence split over devices) and tensor parallel.
MESH_AXES = ("data", "stage", "fsdp", "context", "tensor")
# The axes of a three-entry `mesh.shape` (the layout before `stage` and `context`): still
# accepted, read as (data, fsdp, tensor) with the other axes 1.
SHORT_MESH_AXES = ("data", "fsdp", "tensor")


def full_mesh_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """`shape` over every mesh axis: a three-entry (data, fsdp, tensor) shape gets stage and
    context 1; any other length is returned as it is (validation names it)."""
    if len(shape) != len(SHORT_MESH_AXES):
        return tuple(shape)
    sizes = dict(zip(SHORT_MESH_AXES, shape, strict=True))
    return tuple(sizes.get(axis, 1) for axis in MESH_AXES)


# Logical axis names used by the layers. Weights first, then activations.
LOGICAL_AXES = (
    "vocab",
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "head_dim",
    "layers",
    "norm",
    "table_vocab",
    "table_embed",
    "experts",
    "act_batch",
    "act_seq",
    "act_res_seq",
    "act_embed",
    "act_heads",
    "act_kv_heads",
    "act_mlp",
    "act_vocab",
)

# Logical -> mesh axes. FSDP shards every weight on its `embed` dim, over the context devices
# too (they hold other parts of the same rows, so their weights would otherwise be
# replicated: MaxText does the same); tensor parallelism shards heads / mlp / vocab. The
# embedding table gets its own names so that it is sharded on vocab: sharding its embed dim on
# fsdp makes XLA fully rematerialise the gather (measured: an involuntary full
# rematerialisation in the compiled step).
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vocab", ("tensor",)),
    ("embed", ("fsdp", "context")),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    # Pipeline parallelism: the stacked layers split into contiguous stages (bigjax/stages.py).
    ("layers", ("stage",)),
    ("norm", ()),
    ("table_vocab", ("fsdp", "context", "tensor")),
    ("table_embed", ()),
    # MoE expert weights [E, ...]: expert parallelism over the data-parallel (fsdp) devices.
    # Used first on the array, so their embed dim is then not fsdp-sharded (one mesh axis per
    # array); an E that fsdp does not divide falls back to plain FSDP on embed.
    ("experts", ("fsdp",)),
    ("act_batch", ("data", "fsdp")),
    # Context parallelism: every activation's sequence is split over `context` (attention
    # gathers keys and values across it: bigjax/context.py).
    ("act_seq", ("context",)),
    # Sequence parallelism: the residual stream between tensor-parallel matmuls (norms, adds,
    # dropout, what remat saves per layer) is split on its sequence over `tensor`, so XLA
    # turns each all-reduce into a reduce-scatter + all-gather of the same volume and these
    # activations take 1/tensor of the memory. A no-op when tensor is 1.
    ("act_res_seq", ("context", "tensor")),
    ("act_embed", ()),
    ("act_heads", ("tensor",)),
    ("act_kv_heads", ("tensor",)),
    ("act_mlp", ("tensor",)),
    ("act_vocab", ("tensor",)),
)
