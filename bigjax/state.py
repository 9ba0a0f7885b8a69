"""TrainState and its abstract-first, directly-sharded construction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bigjax import lora, models, stages
from bigjax.config import FinetuneConfig, ModelConfig
from bigjax.sharding import Rules, is_spec, tree_specs
from bigjax.tree import Params, flatten

Leaf = TypeVar("Leaf")  # jax.Array; the same tree of ShapeDtypeStructs, specs or shardings


@flax.struct.dataclass
class TrainState(Generic[Leaf]):
    """Everything that changes during training and lives on device. No host-side objects.
    The same tree also carries its shapes, specs or shardings (init and restore targets)."""

    step: Leaf
    params: Params
    opt_state: optax.OptState


def with_adapters(params: Params, finetune: FinetuneConfig, seed: int) -> Params:
    """The model's parameters plus fresh LoRA adapters under "lora" (when lora_rank > 0)."""
    if not finetune.lora_rank:
        return params
    layout = {path: list(leaf.shape) for path, leaf in flatten(params).items()}
    dtype = next(iter(flatten(params).values())).dtype
    key = jax.random.fold_in(jax.random.key(seed), 1)  # not the model's init stream
    return {**params, "lora": lora.init(layout, finetune, key, dtype)}


def abstract_state(
    graph_state: nnx.State, tx: optax.GradientTransformation, finetune: FinetuneConfig
) -> TrainState[jax.ShapeDtypeStruct]:
    """The TrainState as ShapeDtypeStructs: the init target and the Orbax restore target."""
    params = jax.eval_shape(lambda: with_adapters(nnx.to_pure_dict(graph_state), finetune, 0))
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=jax.eval_shape(tx.init, params),
    )


def state_specs(
    graph_state: nnx.State,
    abstract: TrainState[jax.ShapeDtypeStruct],
    tx: optax.GradientTransformation,
    mesh_shape: dict[str, int],
    rules: Rules,
) -> TrainState[PartitionSpec]:
    """PartitionSpecs for a TrainState: params by their logical names, optimizer moments like
    their parameter, anything else (counts, factored moments of another shape) replicated."""
    param_specs = nnx.to_pure_dict(tree_specs(graph_state, mesh_shape, rules))
    if "lora" in abstract.params:
        param_specs["lora"] = lora.specs(abstract.params["lora"], param_specs)

    def like_param(leaf: Any, param: Any, spec: PartitionSpec) -> Any:
        if isinstance(leaf, optax.MaskedNode):  # a frozen parameter's (empty) slot: no state
            return leaf
        return spec if getattr(leaf, "shape", None) == param.shape else PartitionSpec()

    opt_specs = optax.tree_map_params(
        tx,
        like_param,
        abstract.opt_state,
        abstract.params,
        param_specs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct | optax.MaskedNode) or is_spec(x),
    )
    return TrainState(step=PartitionSpec(), params=param_specs, opt_state=opt_specs)


def state_shardings(
    graph_state: nnx.State,
    abstract: TrainState[jax.ShapeDtypeStruct],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules,
) -> TrainState[NamedSharding]:
    """`state_specs` as NamedShardings on `mesh`."""
    specs = state_specs(graph_state, abstract, tx, dict(mesh.shape), rules)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=is_spec)


def init_state(
    cfg: ModelConfig,
    rules: Rules,
    tx: optax.GradientTransformation,
    seed: int,
    shardings: TrainState[NamedSharding],
    finetune: FinetuneConfig,
    layer_order: Sequence[int] | None = None,
) -> TrainState[jax.Array]:
    """Materialises a fresh TrainState directly in its shardings (no host-side full copy),
    its stacked layers in `layer_order` (bigjax/stages.py; None: as built)."""

    def init() -> TrainState[jax.Array]:
        params = nnx.to_pure_dict(nnx.state(models.build(cfg, rules, seed)))
        params = with_adapters(params, finetune, seed)
        if layer_order is not None and list(layer_order) != sorted(layer_order):
            params = stages.take_layers(params, layer_order)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return jax.jit(init, out_shardings=shardings)()
