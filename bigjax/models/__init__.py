"""Model families: a small explicit registry and abstract-first construction."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from bigjax.config import FAMILY_DEFAULTS, ModelConfig
from bigjax.models import llama, vit
from bigjax.sharding import Rules

# Every family is a preset of the one decoder's switches (config.FAMILY_DEFAULTS).
# The ViT has its own module around the same blocks.
Model = llama.Llama | vit.ViT
FAMILIES: dict[str, type[Model]] = {name: llama.Llama for name in FAMILY_DEFAULTS}
FAMILIES["vit"] = vit.ViT
PARAM_COUNT: dict[str, Callable[[ModelConfig], int]] = {
    name: llama.param_count for name in FAMILY_DEFAULTS
}
PARAM_COUNT["vit"] = vit.param_count
FLOPS_PER_TOKEN: dict[str, Callable[[ModelConfig, int], float]] = {
    name: llama.train_flops_per_token for name in FAMILY_DEFAULTS
}
FLOPS_PER_TOKEN["vit"] = vit.train_flops_per_token


def decoder(model: Model) -> llama.Llama:
    """The model as the token decoder a text task needs (a ViT reads images)."""
    if not isinstance(model, llama.Llama):
        raise TypeError(f"a text task needs the decoder, not {type(model).__name__}")
    return model


def build(cfg: ModelConfig, rules: Rules, seed: int) -> Model:
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
