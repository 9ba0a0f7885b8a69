"""The sharding vocabulary: mesh axes, the layers' logical axes, and the default rules."""

from __future__ import annotations

# Mesh axes, outermost (slowest, DCN-friendly) first: data parallel, pipeline stages, FSDP,
# context (the sequence split over devices), tensor parallel and expert parallel. `expert` is
# innermost, as in MaxText: its all-to-all runs twice per MoE layer, over the nearest devices.
MESH_AXES = ("data", "stage", "fsdp", "context", "tensor", "expert")
# Shorter `mesh.shape`s of earlier layouts, still accepted with the missing axes 1: three
# entries (data, fsdp, tensor), from before `stage` and `context`; five, from before `expert`.
OLDER_MESH_AXES = (("data", "fsdp", "tensor"), ("data", "stage", "fsdp", "context", "tensor"))


def full_mesh_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """`shape` over every mesh axis: a three- or five-entry shape of an older layout gets 1 for
    the axes it lacks; any other length is returned as it is (validation names it)."""
    for axes in OLDER_MESH_AXES:
        if len(shape) == len(axes):
            sizes = dict(zip(axes, shape, strict=True))
            return tuple(sizes.get(axis, 1) for axis in MESH_AXES)
    return tuple(shape)


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
    ("embed", ("fsdp", "context", "expert")),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    # Pipeline parallelism: the stacked layers split into contiguous stages (bigjax/stages.py).
    ("layers", ("stage",)),
    ("norm", ()),
    ("table_vocab", ("fsdp", "context", "tensor", "expert")),
    ("table_embed", ()),
    # MoE expert weights [E, ...]: expert parallelism over `expert`, then over the FSDP devices
    # while E divides (bigjax/experts.py exchanges tokens over both). An axis E takes is not
    # used again on the array (one mesh axis per array), so their embed dim is FSDP-sharded
    # only over what is left: `experts: expert` alone keeps E over `expert` and embed over
    # `fsdp` (2-D). An E that no axis divides falls back to plain FSDP on embed.
    ("experts", ("expert", "fsdp")),
    # The `expert` devices are data parallel everywhere outside the experts (MaxText's choice):
    # they split the batch and, like FSDP, the weights' embed dim.
    ("act_batch", ("data", "fsdp", "expert")),
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
