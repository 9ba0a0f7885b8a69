"""Model families: a small explicit registry and abstract-first construction."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from bigjax.config import ModelConfig
from bigjax.models import llama
from bigjax.sharding import Rules

# Llama and GPT-2 are presets of one decoder (config.FAMILY_DEFAULTS).
FAMILIES: dict[str, type[nnx.Module]] = {"llama": llama.Llama, "gpt2": llama.Llama}
PARAM_COUNT: dict[str, Callable[[ModelConfig], int]] = {
    "llama": llama.param_count,
    "gpt2": llama.param_count,
}
FLOPS_PER_TOKEN: dict[str, Callable[[ModelConfig, int], float]] = {
    "llama": llama.train_flops_per_token,
    "gpt2": llama.train_flops_per_token,
}


def build(cfg: ModelConfig, rules: Rules, seed: int) -> nnx.Module:
    """A concrete model (unsharded; callers shard via `state.init_state`)."""
    with nnx.use_eager_sharding(False):
        return FAMILIES[cfg.family](cfg, rules, rngs=nnx.Rngs(params=seed))


def abstract(cfg: ModelConfig, rules: Rules) -> tuple[nnx.GraphDef, nnx.State]:
    """GraphDef and abstract State (ShapeDtypeStructs with logical-axis metadata); no FLOPs."""
    # jax.eval_shape, not nnx.eval_shape: the latter resolves logical names against whatever
    # mesh is set, while the names here are resolved later by the rules table.
    return jax.eval_shape(lambda: nnx.split(build(cfg, rules, seed=0)))


def count_params(abstract_params: nnx.State) -> int:
    return sum(x.size for x in jax.tree.leaves(abstract_params))
