"""Cross-field validation of a converted `TrainConfig`: inconsistent values fail with the fix."""

from __future__ import annotations

import dataclasses
import re
import typing

from bigjax.config.presets import FAMILY_DEFAULTS
from bigjax.config.rules import MESH_AXES
from bigjax.config.schema import ConfigError, TrainConfig, unknown_choice


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks that need no devices, group by group, in this order (the first
    failure is reported). Raises ConfigError naming key and fix."""
    for check in (
        _choices,
        _run_and_mesh,
        _model,
        _optim,
        _data,
        _checkpoint_and_logging,
        _robust,
        _distill,
        _privacy,
        _finetune,
    ):
        check(cfg)


def _choices(cfg: object, prefix: str = "") -> None:
    """Every Literal-typed field holds one of its values, in every group (the converter checks
    them too; this catches configs built in code with dataclasses.replace)."""
    hints = typing.get_type_hints(type(cfg))
    for field in dataclasses.fields(cfg):  # type: ignore[arg-type]  # a config dataclass
        value, tp = getattr(cfg, field.name), hints[field.name]
        if dataclasses.is_dataclass(value):
            _choices(value, f"{prefix}{field.name}.")
        elif typing.get_origin(tp) is typing.Literal and value not in typing.get_args(tp):
            raise ConfigError(unknown_choice(prefix + field.name, value, typing.get_args(tp)))


def _run_and_mesh(cfg: TrainConfig) -> None:
    """The run length and mesh group."""
    _check(cfg.num_steps > 0, "num_steps", "must be positive")
    # Grain's shuffles take a 32-bit seed (it was its traceback at the first batch)
    _check(0 <= cfg.seed < 2**32, "seed", f"{cfg.seed} is not in 0 .. 2**32 - 1")
    _check(
        -1 <= cfg.data.seed < 2**32,
        "data.seed",
        f"{cfg.data.seed} is not in 0 .. 2**32 - 1 (or -1: the run's seed)",
    )
    shape = cfg.mesh.shape
    _check(
        len(shape) == len(MESH_AXES),
        "mesh.shape",
        f"needs {len(MESH_AXES)} entries {MESH_AXES} (or 5 without expert, or 3: data, fsdp, "
        f"tensor), got {shape}",
    )
    _check(sum(s == -1 for s in shape) <= 1, "mesh.shape", f"allows at most one -1, got {shape}")
    _check(
        all(s == -1 or s > 0 for s in shape),
        "mesh.shape",
        f"entries must be positive or -1, got {shape}",
    )
    dcn = cfg.mesh.dcn_shape
    _check(
        len(dcn) == len(MESH_AXES) and all(s > 0 for s in dcn),
        "mesh.dcn_shape",
        f"needs {len(MESH_AXES)} positive entries {MESH_AXES}, got {dcn}",
    )
    sizes = {a: s * d for a, s, d in zip(MESH_AXES, shape, dcn, strict=True) if s != -1}
    check_mesh_axes(cfg, sizes)


def check_mesh_axes(cfg: TrainConfig, sizes: dict[str, int]) -> None:
    """What the context and stage axes need of the rest of the config, for the axis sizes
    known (a -1 entry is checked once the devices resolve it). Raises ConfigError."""
    rules = dict(cfg.mesh.rules)
    context = sizes.get("context", 1)
    if context > 1:
        _check(
            "context" in rules.get("act_seq", ()),
            "mesh.rules.act_seq",
            f"must include 'context' when the context axis is {context} (the context "
            "devices would each compute the whole sequence); set act_seq=context",
        )
        _check(
            cfg.data.task not in ("classify", "images"),
            "mesh.shape",
            f"context {context} splits each row's sequence, which data.task={cfg.data.task} "
            "does not have or reads by index; use context 1",
        )
        _check(
            cfg.data.seq_len % (2 * context) == 0,
            "data.seq_len",
            f"{cfg.data.seq_len} cannot be cut into 2 x context = {2 * context} equal chunks "
            f"(causal load balancing); use a multiple of {2 * context}",
        )
    if cfg.model.num_experts and cfg.model.moe_dispatch == "dropless":
        token_axes = set(rules.get("act_batch", ())) | set(rules.get("act_seq", ()))
        split = [a for a in rules.get("experts", ()) if sizes.get(a, 1) > 1]
        _check(
            all(a in token_axes for a in split),
            "mesh.rules.experts",
            f"dropless experts are exchanged over the axes that split them ({split}), which "
            "must also split the tokens: map experts to axes of act_batch or act_seq",
        )
    _check(cfg.model.pipeline_microbatches >= 0, "model.pipeline_microbatches", "must be >= 0")
    _check(cfg.model.pipeline_interleave >= 1, "model.pipeline_interleave", "must be >= 1")
    stages = sizes.get("stage", 1)
    if stages > 1:
        laps = cfg.model.pipeline_interleave
        _check(
            cfg.model.num_layers % (stages * laps) == 0,
            "model.num_layers",
            f"{cfg.model.num_layers} layers cannot be split into {stages} pipeline stages x "
            f"{laps} laps (model.pipeline_interleave) of equal chunks; use a multiple of "
            f"{stages * laps} layers, or other stage or lap counts",
        )
        _check(
            "stage" in rules.get("layers", ()),
            "mesh.rules.layers",
            f"must include 'stage' when the stage axis is {stages}; set layers=stage",
        )
        _check(
            not cfg.privacy.enabled,
            "mesh.shape",
            f"stage {stages} with DP-SGD (privacy): its gradient is taken one row at a time, "
            "which a pipeline cannot cut into micro-batches; use stage 1 (fsdp or tensor split "
            "the model instead)",
        )
        micro = cfg.model.pipeline_microbatches or stages
        rows = cfg.data.batch_size // max(cfg.optim.grad_accum_steps, 1)
        _check(
            rows % micro == 0,
            "model.pipeline_microbatches",
            f"{micro} pipeline micro-batches do not divide the {rows} rows of each step's "
            "micro-batch (data.batch_size / optim.grad_accum_steps); use a divisor",
        )
        _check(
            laps == 1 or micro % stages == 0,
            "model.pipeline_microbatches",
            f"the interleaved schedule moves micro-batches in groups of the {stages} stages: "
            f"use a multiple of {stages} (got {micro})",
        )


def _model(cfg: TrainConfig) -> None:
    """The model group."""
    m = cfg.model
    d = cfg.data
    _one_of("model.family", m.family, tuple(FAMILY_DEFAULTS))
    for name in ("d_model", "num_layers", "num_heads", "d_ff", "vocab_size"):
        _check(getattr(m, name) > 0, f"model.{name}", "must be positive")
    _check(m.head_dim >= 0, "model.head_dim", "must be >= 0 (0: d_model / num_heads)")
    _check(
        m.head_dim > 0 or m.d_model % m.num_heads == 0,
        "model.num_heads",
        f"{m.num_heads} heads do not divide d_model={m.d_model}; pick a divisor or set "
        "model.head_dim",
    )
    _check(
        m.kv_heads > 0 and m.num_heads % m.kv_heads == 0,
        "model.num_kv_heads",
        f"{m.num_kv_heads} must divide num_heads={m.num_heads}",
    )
    if m.family == "vit":
        pass  # positions: one per patch and the class token, from the image size
    elif m.positions == "rope":
        _check(m.dim_per_head % 2 == 0, "model.head_dim", "RoPE needs an even head dimension")
    else:
        _check(
            m.max_positions >= d.seq_len,
            "model.max_positions",
            f"the learned position table has {m.max_positions} rows, fewer than "
            f"data.seq_len={d.seq_len}; set model.max_positions >= {d.seq_len}",
        )
    _check(m.rope_factor > 0, "model.rope_factor", "must be positive")
    # RoPE's wavelengths are powers of theta: 0 makes them infinite, and at or below 1 they
    # no longer grow along the head dimension
    _check(m.rope_theta > 1, "model.rope_theta", "must be > 1 (10000 is the usual base)")
    # a norm divides by sqrt(variance + eps): at 0 or below, a constant row divides by zero
    _check(m.norm_eps > 0, "model.norm_eps", "must be positive (1e-6 or 1e-5 are usual)")
    _check(m.num_experts >= 0, "model.num_experts", "must be >= 0 (0: dense MLP)")
    if m.num_experts:
        _check(m.mlp == "swiglu", "model.mlp", "experts are SwiGLU; set model.mlp=swiglu")
        _check(not m.use_bias, "model.use_bias", "experts have no biases; set it false")
        _check(
            1 <= m.experts_per_token <= m.num_experts,
            "model.experts_per_token",
            f"must be in [1, num_experts={m.num_experts}]",
        )
        _check(m.moe_capacity_factor >= 0, "model.moe_capacity_factor", "must be >= 0")
        _check(m.moe_aux_weight >= 0, "model.moe_aux_weight", "must be >= 0")
        _check(m.moe_shared_experts >= 0, "model.moe_shared_experts", "must be >= 0")
        _check(m.moe_route_scale > 0, "model.moe_route_scale", "must be positive")
        _check(m.moe_bias_rate >= 0, "model.moe_bias_rate", "must be >= 0 (0: no bias)")
        _check(m.moe_z_weight >= 0, "model.moe_z_weight", "must be >= 0")
        _check(m.moe_exchange_factor >= 0, "model.moe_exchange_factor", "must be >= 0")
        _check(
            not (m.moe_bias_rate > 0 and cfg.privacy.enabled),
            "model.moe_bias_rate",
            "the balancing bias follows the sign of the batch's load, which DP-SGD's clipping "
            "and noise would scramble; use moe_aux_weight for balance with privacy",
        )
    _check(
        m.rope_scaling != "llama3" or m.rope_high_freq_factor > m.rope_low_freq_factor > 0,
        "model.rope_high_freq_factor",
        "llama3 scaling needs rope_high_freq_factor > rope_low_freq_factor > 0",
    )
    _check(
        m.rope_scaling != "llama3" or m.rope_original_max_positions > 0,
        "model.rope_original_max_positions",
        "llama3 scaling divides the original context by the frequency factors: must be positive",
    )
    _check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")


def _optim(cfg: TrainConfig) -> None:
    """The optimizer group."""
    o = cfg.optim
    d = cfg.data
    _check(o.lr > 0, "optim.lr", "must be positive")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(0.0 < o.decay_fraction <= 1.0, "optim.decay_fraction", "must be in (0, 1]")
    _check(o.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 disables clipping)")
    # b1 or b2 at 1 freezes a moment at its zero start (Adam then divides by 1 - 1); above,
    # it grows without bound; eps 0 makes a parameter with zero gradients 0/0 = NaN
    for name in ("b1", "b2", "momentum"):
        _check(0.0 <= getattr(o, name) < 1.0, f"optim.{name}", "must be in [0, 1)")
    _check(o.eps > 0, "optim.eps", "must be positive (1e-8 is usual)")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0 (0: none)")
    _check(o.z_loss >= 0, "optim.z_loss", "must be >= 0 (a negative one rewards large logits)")
    _check(o.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be >= 1")
    _check(
        d.batch_size % o.grad_accum_steps == 0,
        "data.batch_size",
        f"{d.batch_size} is not divisible by optim.grad_accum_steps={o.grad_accum_steps}",
    )


def _data(cfg: TrainConfig) -> None:
    """The data and task group."""
    m = cfg.model
    d = cfg.data
    _check(d.batch_size > 0 and d.seq_len > 1, "data.batch_size", "batch_size > 0, seq_len > 1")
    _check(0.0 < d.eval_fraction < 1.0, "data.eval_fraction", "must be in (0, 1)")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(
        (d.task == "images") == (m.family == "vit") == bool(d.images),
        "data.task",
        "model.family=vit trains on data.task=images with data.images set (and only it)",
    )
    if m.family == "vit":
        for name in ("image_size", "patch_size", "channels"):
            _check(getattr(m, name) > 0, f"model.{name}", "must be positive")
        _check(m.image_size % m.patch_size == 0, "model.patch_size", "must divide image_size")
        patches = (m.image_size // m.patch_size) ** 2
        _check(
            d.seq_len == patches + 1,
            "data.seq_len",
            f"a ViT row is its {patches} patches and the class token: set data.seq_len="
            f"{patches + 1}",
        )
        _check(m.num_classes >= 2, "model.num_classes", "a ViT classifies: set >= 2")
    _check(
        (d.task in ("lm", "mlm", "images")) == (not d.examples),
        "data.examples",
        "sft and classify read data.examples (a JSON-lines file); lm and mlm read data.path",
    )
    _check(
        (d.task == "mlm") == (not m.causal) or d.task in ("classify", "images"),
        "model.causal",
        f"data.task={d.task!r} needs "
        + ("a bidirectional encoder" if d.task == "mlm" else "a causal decoder")
        + f"; set model.causal={d.task != 'mlm'} (model.family=bert is the masked-LM encoder)",
    )
    _check(0.0 < d.mlm_rate < 1.0, "data.mlm_rate", "must be in (0, 1)")
    _check(
        d.task != "classify" or (d.packing == "pad" and m.num_classes >= 2),
        "data.task",
        "classify needs data.packing=pad (one example per row) and model.num_classes >= 2",
    )


def _checkpoint_and_logging(cfg: TrainConfig) -> None:
    """The checkpoints, NaN policy, metrics, eval group."""
    _check(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0 (0: off)")
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    _check(cfg.checkpoint.keep_every >= 0, "checkpoint.keep_every", "must be >= 0 (0: off)")
    _check(cfg.checkpoint.keep_best >= 0, "checkpoint.keep_best", "must be >= 0 (0: off)")
    _check(cfg.metrics.log_every >= 1, "metrics.log_every", "must be >= 1")
    _check(cfg.eval.every_steps >= 0, "eval.every_steps", "must be >= 0 (0: at the end)")
    _check(cfg.eval.num_batches >= 1, "eval.num_batches", "must be >= 1")
    if cfg.eval.choices == "stdlib":  # the items of the built-in task (a file has its own)
        _check(cfg.eval.choice_items >= 1, "eval.choice_items", "must be >= 1")
    if cfg.eval.harness_tasks:
        _check(cfg.eval.harness_limit >= 0, "eval.harness_limit", "must be >= 0 (0: all)")
    _check(cfg.metrics.peak_flops >= 0, "metrics.peak_flops",
           "must be >= 0 (0: the datasheet's, or measured on CPU)")  # fmt: skip


def _robust(cfg: TrainConfig) -> None:
    """The robustness training group."""
    d = cfg.data
    r = cfg.robust
    _check(r.epsilon > 0 and r.pgd_step_size > 0, "robust.epsilon", "and pgd_step_size > 0")
    _check(r.pgd_steps >= 1, "robust.pgd_steps", "must be >= 1")
    _check(0 <= r.weight <= 1, "robust.weight", "must be in [0, 1]")
    _check(0 <= r.token_dropout < 1 and 0 <= r.span_mask < 1, "robust.token_dropout",
           "token_dropout and span_mask are shares in [0, 1)")  # fmt: skip
    _check(r.span_length >= 1, "robust.span_length", "must be >= 1")
    _check(
        not (r.token_dropout or r.span_mask) or d.task in ("lm", "sft", "classify"),
        "robust.token_dropout",
        "text corruption applies to token inputs (data.task lm, sft or classify)",
    )


def _distill(cfg: TrainConfig) -> None:
    """The distillation group."""
    d = cfg.data
    if cfg.distill.teacher:
        _check(cfg.distill.temperature > 0, "distill.temperature", "must be positive")
        _check(0 <= cfg.distill.alpha <= 1, "distill.alpha", "must be in [0, 1]")
        _check(
            d.task in ("lm", "sft"),
            "distill.teacher",
            "distillation matches next-token distributions: data.task lm or sft",
        )


def _privacy(cfg: TrainConfig) -> None:
    """The DP-SGD group."""
    d = cfg.data
    p = cfg.privacy
    _check(p.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0")
    _check(p.target_epsilon >= 0, "privacy.target_epsilon", "must be >= 0")
    _check(
        not (p.noise_multiplier and p.target_epsilon),
        "privacy.target_epsilon",
        "give the noise multiplier or a target epsilon to calibrate it, not both",
    )
    if p.enabled:
        _check(0 < p.delta < 1, "privacy.delta", "must be in (0, 1)")
        _check(p.clip_norm > 0, "privacy.clip_norm", "must be positive")
        _check(
            p.num_examples > 0 or d.task in ("sft", "classify", "images"),
            "privacy.num_examples",
            "DP accounting needs the rows per epoch; set it for language modelling",
        )
        _check(
            p.num_examples == 0 or p.num_examples >= d.batch_size,
            "privacy.num_examples",
            f"must be at least data.batch_size={d.batch_size}",
        )


def _finetune(cfg: TrainConfig) -> None:
    """The fine-tuning group."""
    f = cfg.finetune
    _check(f.lora_rank >= 0, "finetune.lora_rank", "must be >= 0 (0: no adapters)")
    _check(f.lora_alpha > 0, "finetune.lora_alpha", "must be positive")
    _check(
        not (f.lora_rank and f.freeze),
        "finetune.freeze",
        "with LoRA only the adapters train (the base is frozen); leave freeze empty",
    )
    for key in ("freeze", "lora_targets"):
        try:
            re.compile(getattr(f, key))
        except re.error as e:
            raise ConfigError(f"finetune.{key}: not a regular expression ({e}).") from None


def advice(cfg: TrainConfig) -> list[str]:
    """Values that are valid but rarely what was meant (train prints each as a warning):
    a smoke test with num_steps shrunk on the command line must still run, so not errors."""
    out = []
    o = cfg.optim
    if o.warmup_steps > cfg.num_steps:
        out.append(
            f"optim.warmup_steps={o.warmup_steps} is more than num_steps={cfg.num_steps}: the "
            f"warm-up is cut to {cfg.num_steps} steps and no step trains at the peak lr."
        )
    return out


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}.")


def _one_of(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(unknown_choice(key, value, valid))
