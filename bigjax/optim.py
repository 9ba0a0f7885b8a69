"""Learning-rate schedules and optimizers (optax), with clipping and weight-decay masks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bigjax.config import OptimConfig
from bigjax.tree import path_name


def make_schedule(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then the named decay down to `lr * min_lr_ratio`."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, num_steps)
    rest = max(num_steps - warmup, 1)
    warm = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, floor, rest)
    elif cfg.schedule == "wsd":  # warmup-stable-decay: flat, then a linear cool-down at the end
        decay = max(int(round(rest * cfg.decay_fraction)), 1)
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)],
            [rest - decay],
        )
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")  # config.validate rejects it
    return optax.join_schedules([warm, after], [warmup])


def weight_decay_mask(cfg: OptimConfig) -> Callable[[optax.Params], optax.Params] | None:
    """Decays only matrices by default: norms' scales and biases (ndim < 2) stay undecayed."""
    if cfg.weight_decay_mask == "all":
        return None
    return lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)


def keep_zeros() -> optax.GradientTransformation:
    """Zeroes the update of every parameter that is exactly 0 (a pruned weight), so sparsity
    survives fine-tuning (weight decay of a zero is zero too)."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        # matrices only: biases and norm offsets may start at zero and must still train
        keep = lambda u, p: jnp.where(p == 0, 0, u) if p.ndim >= 2 else u  # noqa: E731
        return jax.tree.map(keep, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    cfg: OptimConfig,
    num_steps: int,
    trainable: Callable[[str], bool] | None = None,
    keep_sparsity: bool = False,
    router_bias_rate: float = 0.0,
) -> optax.GradientTransformation:
    """The optimizer chain: optional global-norm clipping, then the named update rule.

    `trainable(path)` (fine-tuning) splits the parameters: the rest get zero updates and no
    optimizer state, and clipping sees only the trainable gradients, so XLA drops the frozen
    parameters' gradients altogether. `router_bias_rate` > 0: MoE balancing biases move by
    that much against the sign of their "gradient" (the load imbalance, bigjax/moe.py),
    outside clipping, decay and the learning-rate schedule, as DeepSeek-V3 updates them."""
    tx = _update_rule(cfg, num_steps)
    if router_bias_rate > 0:
        tx = _with_router_bias(tx, router_bias_rate)
    if keep_sparsity:
        tx = optax.chain(tx, keep_zeros())
    if trainable is None:
        return tx

    def labels(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "train" if trainable(path_name(path)) else "frozen", params
        )

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def _with_router_bias(
    tx: optax.GradientTransformation, rate: float
) -> optax.GradientTransformation:
    """`tx` for every parameter but the MoE routers' balancing biases: those take
    -rate * sign(imbalance); sign is unchanged by accumulation's and loss weights' scales."""

    def labels(params: Any) -> Any:
        is_bias = lambda path: path_name(path).endswith("router_bias_E")  # noqa: E731
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "bias" if is_bias(path) else "rest", params
        )

    bias = optax.chain(optax.scale_by_sign(), optax.scale(-rate))
    return optax.multi_transform({"rest": tx, "bias": bias}, labels)


def _update_rule(cfg: OptimConfig, num_steps: int) -> optax.GradientTransformation:
    lr = make_schedule(cfg, num_steps)
    mask = weight_decay_mask(cfg)
    if cfg.name == "adamw":
        tx = optax.adamw(
            lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask
        )
    elif cfg.name == "lion":
        tx = optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "adafactor":
        tx = optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=mask)
    elif cfg.name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(cfg.weight_decay, mask),
            optax.sgd(lr, momentum=cfg.momentum or None),
        )
    else:
        raise ValueError(f"unknown optimizer {cfg.name!r}")  # config.validate rejects it
    if cfg.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx
