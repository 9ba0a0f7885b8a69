"""Typed, frozen run configuration and its one strict conversion from a ConfigDict.

Configs are written as `ml_collections.ConfigDict`s (Python files under `configs/`). They are
converted exactly once, here, into frozen dataclasses: unknown keys, wrong types and
inconsistent values fail early with a `ConfigError` that names the key and the fix. Defaults
live only in these dataclasses. Library functions take the narrow sub-config they need.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# Mesh axes, outermost (slowest, DCN-friendly) first.
MESH_AXES = ("data", "fsdp", "tensor")

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

# Logical -> mesh axes. FSDP shards every weight on its `embed` dim; tensor parallelism shards
# heads / mlp / vocab. The embedding table gets its own names so that it is sharded on vocab:
# sharding its embed dim on fsdp makes XLA fully rematerialise the gather (measured: an
# involuntary full rematerialisation in the compiled step).
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("layers", ()),
    ("norm", ()),
    ("table_vocab", ("fsdp", "tensor")),
    ("table_embed", ()),
    # MoE expert weights [E, ...]: expert parallelism over the data-parallel (fsdp) devices.
    # Used first on the array, so their embed dim is then not fsdp-sharded (one mesh axis per
    # array); an E that fsdp does not divide falls back to plain FSDP on embed.
    ("experts", ("fsdp",)),
    ("act_batch", ("data", "fsdp")),
    ("act_seq", ()),
    # Sequence parallelism: the residual stream between tensor-parallel matmuls (norms, adds,
    # dropout, what remat saves per layer) is split on its sequence over `tensor`, so XLA
    # turns each all-reduce into a reduce-scatter + all-gather of the same volume and these
    # activations take 1/tensor of the memory. A no-op when tensor is 1.
    ("act_res_seq", ("tensor",)),
    ("act_embed", ()),
    ("act_heads", ("tensor",)),
    ("act_kv_heads", ("tensor",)),
    ("act_mlp", ("tensor",)),
    ("act_vocab", ("tensor",)),
)

# Llama 3.2's RoPE: base 500k, extended 32x from 8k positions with the llama3 bands.
LLAMA32_ROPE = dict(
    rope_theta=500000.0,
    rope_scaling="llama3",
    rope_factor=32.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_positions=8192,
)

# Named model sizes (the 1b/3b/8b rows are Llama 3.2 1B, 3.2 3B and 3 8B).
# Setting `model.size` fills these; any dimension set explicitly in the config wins.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=384, vocab_size=512),
    "small": dict(
        d_model=512, num_layers=8, num_heads=8, num_kv_heads=8, d_ff=2048, vocab_size=32000
    ),
    "125m": dict(
        d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, d_ff=2048, vocab_size=32000
    ),
    "350m": dict(
        d_model=1024, num_layers=24, num_heads=16, num_kv_heads=16, d_ff=2816, vocab_size=32000
    ),
    "1b": dict(
        d_model=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        d_ff=8192,
        vocab_size=128256,
        tie_embeddings=True,
        **LLAMA32_ROPE,
    ),
    "3b": dict(
        d_model=3072,
        num_layers=28,
        num_heads=24,
        num_kv_heads=8,
        d_ff=8192,
        vocab_size=128256,
        tie_embeddings=True,
        **LLAMA32_ROPE,
    ),
    "8b": dict(
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        d_ff=14336,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
}

# Families are presets of the one decoder's architecture switches: `model.family='gpt2'` fills
# these, and any field set explicitly in the config wins (like `model.size`). The switches stay
# separate fields so an ablation can change one (say, learned positions in a Llama).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "gpt2": dict(
        positions="learned",
        max_positions=1024,
        norm="layernorm",
        norm_eps=1e-5,
        mlp="gelu",
        use_bias=True,
        tie_embeddings=True,
    ),
    # An image classifier (data.task=images): patches, a class token, learned positions.
    "vit": dict(
        causal=False,
        positions="learned",
        norm="layernorm",
        norm_eps=1e-6,
        mlp="gelu",
        use_bias=True,
        tie_embeddings=True,
        vocab_size=1,  # no token table
    ),
    # An encoder for masked-LM pretraining (data.task=mlm). Pre-norm, unlike the original
    # BERT's post-norm: the same blocks as the decoders, and stabler without warmup tricks.
    "bert": dict(
        causal=False,
        positions="learned",
        max_positions=512,
        norm="layernorm",
        norm_eps=1e-12,
        mlp="gelu",
        use_bias=True,
        tie_embeddings=True,
    ),
}
POSITIONS = ("rope", "learned")
ROPE_SCALINGS = ("default", "linear", "llama3")
MLPS = ("swiglu", "gelu")
REMAT_POLICIES = ("none", "full", "save_matmuls")
OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")
SCHEDULES = ("cosine", "linear", "wsd", "constant")
DTYPES = ("float32", "bfloat16", "float16")
# 'auto': cuDNN flash attention on NVIDIA GPUs, Pallas splash on TPUs, einsum on CPUs
# (bigjax/attention.py says when each applies).
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn", "splash")
NORMS = ("rmsnorm", "layernorm")
WEIGHT_DECAY_MASKS = ("matrices", "all")


class ConfigError(ValueError):
    """A config value is unknown, mistyped or inconsistent; the message names key and fix."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh and the logical-to-mesh sharding rules.

    `shape` is (data, fsdp, tensor); at most one entry may be -1 (use the remaining devices).
    `rules` overrides entries of `DEFAULT_RULES`, e.g. `{'embed': None, 'mlp': ('tensor',)}`.
    """

    shape: tuple[int, ...] = (1, -1, 1)
    # Multi-slice: (data, fsdp, tensor) across slices (over DCN); `shape` is then the mesh
    # inside each slice (over ICI) and each mesh axis is dcn_shape * shape long.
    dcn_shape: tuple[int, ...] = (1, 1, 1)
    rules: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RULES


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder architecture, numerics and memory policy."""

    family: str = "llama"
    size: str = ""  # a key of MODEL_SIZES, or '' to give every dimension explicitly
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: same as num_heads (no grouping)
    head_dim: int = 0  # 0: d_model // num_heads
    d_ff: int = 384
    vocab_size: int = 512
    tie_embeddings: bool = False
    positions: str = "rope"  # one of POSITIONS: 'rope' (Llama) or 'learned' (GPT-2's table)
    max_positions: int = 0  # rows of the learned position table (>= data.seq_len)
    rope_theta: float = 10000.0
    # Context extension, as Hugging Face's rope_type (layers.Rope): 'default', 'linear' or
    # 'llama3' (Llama 3.1+), with its factors.
    rope_scaling: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    norm: str = "rmsnorm"  # one of NORMS: 'rmsnorm' (Llama) or 'layernorm' (GPT-2, with bias)
    mlp: str = "swiglu"  # one of MLPS: 'swiglu' (Llama) or 'gelu' (GPT-2, tanh form)
    use_bias: bool = False  # biases on the attention and MLP projections (GPT-2)
    causal: bool = True  # False: bidirectional attention (an encoder: BERT, ViT)
    image_size: int = 32  # ViT: square images of this many pixels a side
    patch_size: int = 4  # ViT: square patches, `image_size` divisible by it
    channels: int = 3  # ViT: 1 (grayscale) or 3 (RGB)
    # > 0: a classification head [D, num_classes] on the last real token (data.task=classify)
    num_classes: int = 0
    # Mixture of experts (bigjax/moe.py): 0 = dense MLP; else this many SwiGLU experts of width
    # d_ff per layer, `experts_per_token` (top-k) chosen per token by a learned router.
    num_experts: int = 0
    experts_per_token: int = 2
    moe_capacity_factor: float = 1.25  # slots per expert = factor * L * k / E; 0: no drops
    moe_aux_weight: float = 0.01  # load-balancing loss coefficient
    norm_eps: float = 1e-6
    dropout: float = 0.0
    param_dtype: str = "float32"
    dtype: str = "auto"  # compute dtype; auto: float32 on CPU, bfloat16 on GPU/TPU
    scan_layers: bool = True
    remat: str = "none"  # one of REMAT_POLICIES
    attention: str = "auto"  # one of ATTENTION_IMPLS

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer, learning-rate schedule, clipping, weight decay and gradient accumulation."""

    name: str = "adamw"
    lr: float = 3e-3
    schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr / peak lr for cosine, linear and wsd
    decay_fraction: float = 0.2  # wsd: fraction of the steps spent decaying
    weight_decay: float = 0.1
    weight_decay_mask: str = "matrices"  # 'matrices': skip norms, biases (ndim < 2); or 'all'
    clip_norm: float = 1.0  # 0 disables global-norm clipping
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9  # sgd
    z_loss: float = 0.0  # coefficient of log(Z)^2, keeps logits from drifting
    grad_accum_steps: int = 1  # micro-batches per optimizer step (a scan inside the step)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from and how they are batched."""

    path: str = ""  # a prepared dataset (`bigjax prepare`); '' = the built-in corpus
    mixture: tuple[tuple[str, float], ...] = ()  # (dataset dir, weight) pairs; overrides path
    # What the rows hold: 'lm' (documents, next-token loss everywhere), 'mlm' (documents,
    # masked-token loss; an encoder), 'sft' (prompt/response pairs, loss on responses) or
    # 'classify' (text and label; needs model.num_classes) or 'images' (the ViT's labelled
    # images, bigjax/data/images.py).
    task: str = "lm"
    mlm_rate: float = 0.15  # task 'mlm': share of real tokens masked (80/10/10, bigjax/mlm.py)
    examples: str = ""  # sft/classify: a JSON-lines file of examples (bigjax/data/examples.py)
    images: str = ""  # task 'images': 'digits' (scikit-learn's) or DIR/<class>/<image files>
    augment: bool = True  # task 'images': random crops, brightness, contrast on train images
    flip: bool = False  # task 'images', with augment: also random horizontal flips
    packing: str = "concat"  # 'concat' (concat-then-split), 'first_fit', 'pad' (one per row)
    tokenizer: str = "byte"  # built-in corpus only; prepared datasets carry their own
    batch_size: int = 16  # global batch, in sequences
    seq_len: int = 256
    eval_fraction: float = 0.02  # share of documents held out for eval, chosen by path hash
    num_workers: int = 0  # Grain prefetch processes; 0 reads in the training process
    shuffle: bool = True
    # Seed of the document order; -1: the run's `seed`. Fix it to vary only the initialisation
    # across seeds (ablations do: every variant and seed then sees the same batches).
    seed: int = -1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing."""

    every_steps: int = 1000
    keep: int = 3  # newest checkpoints kept
    keep_every: int = 0  # also keep every N-th step for good (0: off)
    keep_best: int = 0  # also keep the N lowest eval losses (0: off)
    async_save: bool = True
    init_from: str = ""  # another run's workdir (or checkpoints dir) to start from
    init_mode: str = "params"  # 'params': weights only, fresh optimizer; 'full': whole state


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """What is logged where."""

    log_every: int = 10
    peak_flops: float = 0.0  # per device; 0: datasheet (TPU/GPU) or measured (CPU)
    tensorboard: bool = True
    plot: bool = True


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out loss and perplexity; optionally multiple-choice accuracy."""

    every_steps: int = 0  # 0: only at the end of the run
    num_batches: int = 4
    # Multiple choice by log-likelihood at every eval: a JSON-lines file of {context,
    # choices, answer}, or 'stdlib' (next line of held-out standard-library files, 4 choices).
    choices: str = ""
    choice_items: int = 40  # items of the 'stdlib' task (cost: items x 4 sequences forward)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Which parameters train: frozen subsets and LoRA adapters (bigjax/lora.py). Combine with
    checkpoint.init_from to start from a trained or imported model."""

    # Regex over parameter paths (e.g. 'embed/.*|blocks/attn/.*', see `bigjax.checkpoint.
    # param_layout`): matching parameters get no updates and no optimizer moments.
    freeze: str = ""
    lora_rank: int = 0  # > 0: train rank-r adapters on lora_targets, freeze the base model
    lora_alpha: float = 16.0  # adapters are scaled by lora_alpha / lora_rank
    lora_targets: str = r"blocks/(attn|mlp)/.*"  # regex over parameter paths (matrices only)
    keep_sparsity: bool = False  # weights that start at exactly 0 (pruned) stay 0

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0


@dataclasses.dataclass(frozen=True)
class RobustConfig:
    """Adversarial training in embedding space and text corruption (bigjax/robust.py)."""

    adversarial: str = "none"  # 'none', 'fgsm' or 'pgd': train on perturbed embeddings too
    epsilon: float = 0.01  # L-infinity radius of the perturbation (embeddings are ~1/sqrt(D))
    pgd_steps: int = 3
    pgd_step_size: float = 0.005
    weight: float = 0.5  # objective = (1 - weight) * clean + weight * adversarial
    eval_attack: str = "none"  # 'fgsm' or 'pgd': also report eval_adv_loss under attack
    token_dropout: float = 0.0  # share of input tokens replaced by random ones
    span_mask: float = 0.0  # share of input tokens masked in spans
    span_length: int = 3


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation: the loss mixes the hard next-token loss with the KL divergence
    to a teacher run's softened predictions (Hinton et al. 2015)."""

    teacher: str = ""  # a run directory (trained, imported or compressed) with the same vocab
    temperature: float = 2.0  # both distributions are softened by T; the KL is scaled by T^2
    alpha: float = 0.5  # weight of the distillation term; 1 - alpha on the hard labels


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD (bigjax/privacy.py): on when noise_multiplier or target_epsilon is set."""

    noise_multiplier: float = 0.0  # sigma; 0 with target_epsilon: calibrated to reach it
    target_epsilon: float = 0.0  # epsilon after num_steps steps (calibrates sigma)
    delta: float = 1e-5
    clip_norm: float = 1.0  # each example's gradient is scaled to at most this norm
    # Rows per epoch, for the sampling rate batch_size / num_examples; 0: the size of the
    # train split of data.examples or data.images (language modelling must set it).
    num_examples: int = 0

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0 or self.target_epsilon > 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The whole run."""

    seed: int = 0
    num_steps: int = 1000
    nan_policy: str = "error"  # on a non-finite loss/grad: 'error', 'skip' or 'rollback'
    mesh: MeshConfig = MeshConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    metrics: MetricsConfig = MetricsConfig()
    eval: EvalConfig = EvalConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    distill: DistillConfig = DistillConfig()
    robust: RobustConfig = RobustConfig()
    # Per-platform tuning (bigjax/tuning.py): the config file's `platforms` table as JSON
    # until the devices are known; then '' and `platform` names the entry that was applied.
    platforms: str = ""
    platform: str = ""

    @property
    def data_seed(self) -> int:
        return self.seed if self.data.seed < 0 else self.data.seed


# ----------------------------------------------------------------------------- conversion


def load_python_function(path: str | Path, function: str, what: str, hint: str) -> Callable:
    """Runs a Python file (a config or a sweep spec: Python by design, like big_vision's
    configs, so only load your own) and returns its top-level `function`."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what}: no such file {str(path)!r}. {hint}")
    module_spec = importlib.util.spec_from_file_location(f"bigjax_{what}_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, function, None)):
        raise ConfigError(f"{what}: {path} defines no {function}() function.")
    return getattr(module, function)


def from_configdict(cd: Any) -> TrainConfig:
    """Converts a ConfigDict (or nested mapping) into a validated `TrainConfig`.

    Raises:
      ConfigError: on an unknown key, a value of the wrong type or an inconsistent config.
    """
    raw = _to_plain(cd)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"get_config() must return a ConfigDict, got {type(cd).__name__}.")
    raw = dict(raw)
    if isinstance(raw.get("model"), Mapping):
        raw["model"] = _apply_presets(dict(raw["model"]))
    if isinstance(raw.get("mesh"), Mapping) and "rules" in raw["mesh"]:
        raw["mesh"] = {**raw["mesh"], "rules": _merge_rules(raw["mesh"]["rules"])}
    if isinstance(raw.get("platforms"), Mapping):
        raw["platforms"] = _platforms_json(raw)
    cfg = _build(TrainConfig, raw, "")
    validate(cfg)
    return cfg


MICRO_BATCH = "micro_batch_per_device"  # the one non-config key a platforms entry may hold


def merge_groups(base: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """`entry`'s values over `base`'s, group by group."""
    out = dict(base)
    for key, value in entry.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_groups(out[key], value)
        else:
            out[key] = value
    return out


def _platforms_json(raw: dict[str, Any]) -> str:
    """The `platforms` table as JSON, after checking that every entry gives a valid config
    (a typo fails at load time on every machine, not only on the one it is for)."""
    table = _to_plain(raw["platforms"])
    for key, entry in table.items():
        if not isinstance(entry, Mapping):
            raise ConfigError(f"platforms.{key}: expected a group of config keys, got {entry!r}.")
        micro = entry.get(MICRO_BATCH, 1)
        if not isinstance(micro, int) or isinstance(micro, bool) or micro < 1:
            raise ConfigError(
                f"platforms.{key}.{MICRO_BATCH}: expected a positive int, got {micro!r}."
            )
        body = {k: v for k, v in entry.items() if k != MICRO_BATCH}
        try:
            from_configdict(merge_groups({**raw, "platforms": ""}, body))
        except ConfigError as e:
            raise ConfigError(f"platforms.{key}: {e}") from None
    return json.dumps(table, sort_keys=True)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as JSON-ready nested dicts (rules become a mapping)."""
    out = dataclasses.asdict(cfg)
    if "mesh" in out:
        out["mesh"]["rules"] = {name: list(axes) for name, axes in cfg.mesh.rules}
    if "data" in out:
        out["data"]["mixture"] = dict(cfg.data.mixture)
    return out


def _to_plain(x: Any) -> Any:
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {k: _to_plain(v) for k, v in x.items()}
    return x


def _apply_presets(model: dict[str, Any]) -> dict[str, Any]:
    family, size = model.get("family", "llama"), model.get("size", "")
    if family not in FAMILY_DEFAULTS:
        raise ConfigError(_unknown("model.family", family, FAMILY_DEFAULTS))
    if size and size not in MODEL_SIZES:
        raise ConfigError(_unknown("model.size", size, MODEL_SIZES))
    return {**FAMILY_DEFAULTS[family], **MODEL_SIZES.get(size, {}), **model}


def _merge_rules(user: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Overlays user rules (a mapping or pairs) on `DEFAULT_RULES`."""
    if isinstance(user, str):
        user = _parse_rules_string(user)
    pairs = list(user.items()) if isinstance(user, Mapping) else list(user)
    rules = dict(DEFAULT_RULES)
    for name, axes in pairs:
        if name not in LOGICAL_AXES:
            raise ConfigError(_unknown("mesh.rules", name, LOGICAL_AXES))
        if axes is None or axes == "" or axes == "None":
            axes = ()
        elif isinstance(axes, str):
            axes = tuple(a for a in axes.replace("+", ",").split(",") if a)
        axes = tuple(axes)
        for axis in axes:
            if axis not in MESH_AXES:
                raise ConfigError(
                    f"mesh.rules.{name}: unknown mesh axis {axis!r}; use any of {MESH_AXES}."
                )
        rules[name] = axes
    return tuple(rules.items())


def _parse_mixture(value: Any) -> tuple[tuple[str, float], ...]:
    """{'dirA': 0.7, 'dirB': 0.3}, [('dirA', 0.7), ...] or 'dirA:0.7,dirB:0.3'."""
    if isinstance(value, str):
        pairs = []
        for item in filter(None, (s.strip() for s in value.split(","))):
            path, sep, weight = item.rpartition(":")
            if not sep:
                raise ConfigError(f"data.mixture: expected PATH:WEIGHT, got {item!r}.")
            pairs.append((path, weight))
    else:
        pairs = list(value.items()) if isinstance(value, Mapping) else list(value)
    out = []
    for path, weight in pairs:
        w = _scalar(float, weight, f"data.mixture[{path}]")
        if w <= 0:
            raise ConfigError(f"data.mixture: weight of {path!r} must be positive, got {w}.")
        out.append((str(path), w))
    return tuple(out)


def _parse_rules_string(text: str) -> dict[str, str]:
    """'embed=fsdp,mlp=tensor' -> {'embed': 'fsdp', 'mlp': 'tensor'}; '+' joins axes."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise ConfigError(f"mesh.rules: expected name=axis[+axis], got {item!r}.")
        name, axes = item.split("=", 1)
        out[name.strip()] = axes.strip()
    return out


def _unknown(key: str, value: str, valid: Any) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(str(value), valid, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{key}: unknown value {value!r}.{hint} Valid: {', '.join(map(str, valid))}."


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a group of keys, got {raw!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            hint = f" Did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(
                f"unknown config key {path!r}.{hint} Valid keys under "
                f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}."
            )
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Checks (and, for strings from the command line, parses) one value against its type."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path + ".")
    if path == "mesh.rules":
        return value if isinstance(value, tuple) else _merge_rules(value)
    if path == "data.mixture":
        return _parse_mixture(value)
    origin = typing.get_origin(tp)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a tuple like 1,8,1, got {value!r}.")
        (elem,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_coerce(elem, v, path) for v in value)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{path}: unsupported type {tp}.")  # not used by any field
    return _scalar(tp, value, path)


def _scalar(tp: type, value: Any, path: str) -> Any:
    if isinstance(value, str) and tp is not str:
        value = _parse_string(tp, value, path)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}.")
    return value


def _parse_string(tp: type, text: str, path: str) -> Any:
    text = text.strip()
    try:
        if tp is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if tp is int:
            return int(float(text)) if "e" in text.lower() else int(text)
        if tp is float:
            return float(text)
    except ValueError:
        pass
    raise ConfigError(f"{path}: expected {tp.__name__}, got {text!r}.")


# ----------------------------------------------------------------------------- validation


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks that need no devices. Raises ConfigError naming key and fix."""
    m, o, d = cfg.model, cfg.optim, cfg.data
    _check(cfg.num_steps > 0, "num_steps", "must be positive")
    shape = cfg.mesh.shape
    _check(
        len(shape) == len(MESH_AXES),
        "mesh.shape",
        f"needs {len(MESH_AXES)} entries {MESH_AXES}, got {shape}",
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
    _one_of("model.family", m.family, tuple(FAMILY_DEFAULTS))
    for name in ("d_model", "num_layers", "num_heads", "d_ff", "vocab_size"):
        _check(getattr(m, name) > 0, f"model.{name}", "must be positive")
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
    _one_of("model.positions", m.positions, POSITIONS)
    _one_of("model.mlp", m.mlp, MLPS)
    _one_of("model.rope_scaling", m.rope_scaling, ROPE_SCALINGS)
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
    _check(
        m.rope_scaling != "llama3" or m.rope_high_freq_factor > m.rope_low_freq_factor,
        "model.rope_high_freq_factor",
        "llama3 scaling needs rope_high_freq_factor > rope_low_freq_factor",
    )
    _check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    _one_of("model.param_dtype", m.param_dtype, DTYPES)
    _one_of("model.dtype", m.dtype, ("auto", *DTYPES))
    _one_of("model.remat", m.remat, REMAT_POLICIES)
    _one_of("model.attention", m.attention, ATTENTION_IMPLS)
    _one_of("model.norm", m.norm, NORMS)
    _one_of("optim.name", o.name, OPTIMIZERS)
    _one_of("optim.schedule", o.schedule, SCHEDULES)
    _one_of("optim.weight_decay_mask", o.weight_decay_mask, WEIGHT_DECAY_MASKS)
    _check(o.lr > 0, "optim.lr", "must be positive")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(0.0 < o.decay_fraction <= 1.0, "optim.decay_fraction", "must be in (0, 1]")
    _check(o.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 disables clipping)")
    _check(o.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be >= 1")
    _check(
        d.batch_size % o.grad_accum_steps == 0,
        "data.batch_size",
        f"{d.batch_size} is not divisible by optim.grad_accum_steps={o.grad_accum_steps}",
    )
    _check(d.batch_size > 0 and d.seq_len > 1, "data.batch_size", "batch_size > 0, seq_len > 1")
    _check(0.0 < d.eval_fraction < 1.0, "data.eval_fraction", "must be in (0, 1)")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _one_of("data.tokenizer", d.tokenizer, ("byte",))
    _one_of("data.packing", d.packing, ("concat", "first_fit", "pad"))
    _one_of("data.task", d.task, ("lm", "mlm", "sft", "classify", "images"))
    _check(
        (d.task == "images") == (m.family == "vit") == bool(d.images),
        "data.task",
        "model.family=vit trains on data.task=images with data.images set (and only it)",
    )
    if m.family == "vit":
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
    _check(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0 (0: off)")
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    _check(cfg.checkpoint.keep_every >= 0, "checkpoint.keep_every", "must be >= 0 (0: off)")
    _check(cfg.checkpoint.keep_best >= 0, "checkpoint.keep_best", "must be >= 0 (0: off)")
    _one_of("checkpoint.init_mode", cfg.checkpoint.init_mode, ("params", "full"))
    _one_of("nan_policy", cfg.nan_policy, ("error", "skip", "rollback"))
    _check(cfg.metrics.log_every >= 1, "metrics.log_every", "must be >= 1")
    _check(cfg.eval.every_steps >= 0, "eval.every_steps", "must be >= 0 (0: at the end)")
    _check(cfg.eval.num_batches >= 1, "eval.num_batches", "must be >= 1")
    r = cfg.robust
    _one_of("robust.adversarial", r.adversarial, ("none", "fgsm", "pgd"))
    _one_of("robust.eval_attack", r.eval_attack, ("none", "fgsm", "pgd"))
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
    _check(
        r.adversarial == "none" or not (cfg.privacy.noise_multiplier or cfg.privacy.target_epsilon),
        "robust.adversarial",
        "adversarial training with DP-SGD is not supported",
    )
    if cfg.distill.teacher:
        _check(cfg.distill.temperature > 0, "distill.temperature", "must be positive")
        _check(0 <= cfg.distill.alpha <= 1, "distill.alpha", "must be in [0, 1]")
        _check(
            d.task in ("lm", "sft"),
            "distill.teacher",
            "distillation matches next-token distributions: data.task lm or sft",
        )
        _check(
            not (cfg.privacy.noise_multiplier or cfg.privacy.target_epsilon),
            "distill.teacher",
            "DP-SGD with distillation is not supported; distill first, or train privately",
        )
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


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}.")


def _one_of(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(_unknown(key, value, valid))
