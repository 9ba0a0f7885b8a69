"""The run configuration's schema: frozen dataclasses, one per group, and their choices."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from typing import Literal, get_args

from bigjax.config.rules import DEFAULT_RULES
from bigjax.errors import UsageError

# Choice fields are Literal types: the converter accepts only their values (with a
# did-you-mean error) and a type checker sees every comparison against them.
Position = Literal["rope", "learned"]
RopeScaling = Literal["default", "linear", "llama3"]
Mlp = Literal["swiglu", "gelu"]
MoEDispatch = Literal["capacity", "dropless"]
MoEGating = Literal["softmax", "sigmoid"]
MatmulPrecision = Literal["default", "fp8"]
RematPolicy = Literal["none", "full", "save_matmuls"]
Optimizer = Literal["adamw", "adafactor", "lion", "sgd"]
Schedule = Literal["cosine", "linear", "wsd", "constant"]
Dtype = Literal["float32", "bfloat16", "float16"]
ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]
# 'auto': cuDNN flash attention on NVIDIA GPUs, Pallas splash on TPUs, einsum on CPUs
# (bigjax/attention.py says when each applies).
AttentionImpl = Literal["auto", "einsum", "xla", "cudnn", "splash"]
Norm = Literal["rmsnorm", "layernorm"]
WeightDecayMask = Literal["matrices", "all"]
Task = Literal["lm", "mlm", "sft", "classify", "images"]
Packing = Literal["concat", "first_fit", "pad"]
BuiltinTokenizer = Literal["byte"]
InitMode = Literal["params", "full"]
NanPolicy = Literal["error", "skip", "rollback"]
Attack = Literal["none", "fgsm", "pgd"]
DpAccountant = Literal["rdp", "pld"]

POSITIONS = get_args(Position)
ROPE_SCALINGS = get_args(RopeScaling)
MLPS = get_args(Mlp)
REMAT_POLICIES = get_args(RematPolicy)
OPTIMIZERS = get_args(Optimizer)
SCHEDULES = get_args(Schedule)
DTYPES = get_args(Dtype)
ATTENTION_IMPLS = get_args(AttentionImpl)
NORMS = get_args(Norm)
WEIGHT_DECAY_MASKS = get_args(WeightDecayMask)


class ConfigError(UsageError, ValueError):
    """A config value is unknown, mistyped or inconsistent; the message names key and fix."""


def unknown_choice(key: str, value: str, valid: Iterable[object]) -> str:
    names = [str(v) for v in valid]
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{key}: unknown value {value!r}.{hint} Valid: {', '.join(names)}."


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh and the logical-to-mesh sharding rules.

    `shape` is (data, stage, fsdp, context, tensor, expert); at most one entry may be -1 (use
    the remaining devices). Shapes of older layouts are read with the missing axes 1: five
    entries (data, stage, fsdp, context, tensor) and three (data, fsdp, tensor).
    `rules` overrides entries of `DEFAULT_RULES`, e.g. `{'embed': None, 'mlp': ('tensor',)}`.
    """

    shape: tuple[int, ...] = (1, 1, -1, 1, 1, 1)
    # Multi-slice: the same axes across slices (over DCN); `shape` is then the mesh inside
    # each slice (over ICI) and each mesh axis is dcn_shape * shape long.
    dcn_shape: tuple[int, ...] = (1, 1, 1, 1, 1, 1)
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
    positions: Position = "rope"  # 'rope' (Llama) or 'learned' (GPT-2's table)
    max_positions: int = 0  # rows of the learned position table (>= data.seq_len)
    rope_theta: float = 10000.0
    # Context extension, as Hugging Face's rope_type (layers.Rope): 'default', 'linear' or
    # 'llama3' (Llama 3.1+), with its factors.
    rope_scaling: RopeScaling = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    norm: Norm = "rmsnorm"  # 'rmsnorm' (Llama) or 'layernorm' (GPT-2, with bias)
    mlp: Mlp = "swiglu"  # 'swiglu' (Llama) or 'gelu' (GPT-2, tanh form)
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
    # 'capacity' (one-hot dispatch, drops over capacity) or 'dropless' (grouped matmuls,
    # expert parallelism by all-to-all over the `experts` rule's mesh axes: bigjax/experts.py)
    moe_dispatch: MoEDispatch = "capacity"
    moe_gating: MoEGating = "softmax"  # router scores: 'softmax' (Mixtral) or 'sigmoid' (DS-V3)
    moe_shared_experts: int = 0  # always-on experts of width d_ff beside the routed ones
    moe_route_scale: float = 1.0  # the gates' scale (DeepSeek's routed_scaling_factor)
    # > 0: auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias on the choice,
    # moved by this much per step against the load imbalance (0.001 in DeepSeek-V3)
    moe_bias_rate: float = 0.0
    moe_z_weight: float = 0.0  # router z-loss coefficient (ST-MoE: 0.001)
    # dropless with experts split over devices: all-to-all buffer rows per destination as a
    # multiple of the balanced share; 0: every assignment fits (no drops, EP x the memory)
    moe_exchange_factor: float = 0.0
    norm_eps: float = 1e-6
    dropout: float = 0.0
    param_dtype: Dtype = "float32"
    dtype: ComputeDtype = "auto"  # compute dtype; auto: float32 on CPU, bfloat16 on GPU/TPU
    scan_layers: bool = True
    # With a mesh `stage` axis > 1: micro-batches in flight in the pipeline, each step's
    # (accumulation) micro-batch cut into this many (0: as many as stages). More shrink the
    # bubble, (stages - 1) / (micro-batches + stages - 1), at smaller matmuls.
    pipeline_microbatches: int = 0
    # Laps of the circular (interleaved) schedule: each stage holds this many chunks of the
    # layers, and the bubble shrinks to (stages - 1) / (laps x micro-batches + stages - 1).
    pipeline_interleave: int = 1
    remat: RematPolicy = "none"
    attention: AttentionImpl = "auto"
    # 'fp8': attention's and the MLP's projections in float8 (e4m3 forward, e5m2 gradients,
    # per-tensor dynamic scaling: bigjax/fp8.py); parameters stay in param_dtype
    matmul_precision: MatmulPrecision = "default"

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer, learning-rate schedule, clipping, weight decay and gradient accumulation."""

    name: Optimizer = "adamw"
    lr: float = 3e-3
    schedule: Schedule = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr / peak lr for cosine, linear and wsd
    decay_fraction: float = 0.2  # wsd: fraction of the steps spent decaying
    weight_decay: float = 0.1
    weight_decay_mask: WeightDecayMask = (
        "matrices"  # 'matrices': skip norms, biases (ndim < 2); or 'all'
    )
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
    task: Task = "lm"
    mlm_rate: float = 0.15  # task 'mlm': share of real tokens masked (80/10/10, bigjax/mlm.py)
    examples: str = ""  # sft/classify: a JSON-lines file of examples (bigjax/data/examples.py)
    images: str = ""  # task 'images': 'digits' (scikit-learn's) or DIR/<class>/<image files>
    augment: bool = True  # task 'images': random crops, brightness, contrast on train images
    flip: bool = False  # task 'images', with augment: also random horizontal flips
    packing: Packing = "concat"  # 'concat' (concat-then-split), 'first_fit', 'pad' (one per row)
    tokenizer: BuiltinTokenizer = "byte"  # built-in corpus only; prepared datasets carry their own
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
    init_mode: InitMode = "params"  # 'params': weights only, fresh optimizer; 'full': whole state


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """What is logged where."""

    log_every: int = 10
    peak_flops: float = 0.0  # per device; 0: datasheet (TPU/GPU) or measured (CPU)
    tensorboard: bool = True
    plot: bool = True
    plot_log_scale: bool = True  # loss.png's loss axis: log (the first steps stay in view)
    # Weights & Biases project to log to ('' off; needs the `wandb` extra). Entity, mode and
    # key: W&B's environment variables (WANDB_ENTITY, WANDB_MODE=offline, WANDB_API_KEY).
    wandb_project: str = ""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out loss and perplexity; optionally multiple-choice accuracy."""

    every_steps: int = 0  # 0: only at the end of the run
    num_batches: int = 4
    # Multiple choice by log-likelihood at every eval: a JSON-lines file of {context,
    # choices, answer}, or 'stdlib' (next line of held-out standard-library files, 4 choices).
    choices: str = ""
    choice_items: int = 40  # items of the 'stdlib' task (cost: items x 4 sequences forward)
    # lm-evaluation-harness tasks scored at every eval (comma-separated, e.g.
    # 'arc_easy,hellaswag'), logged as harness/TASK/METRIC; needs `pip install bigjax[harness]`
    # and, offline, the tasks' data in local files (harness_include_path: their YAML files)
    harness_tasks: str = ""
    harness_include_path: str = ""
    harness_limit: float = 0.0  # documents per task (a fraction if < 1); 0: all


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

    adversarial: Attack = "none"  # 'none', 'fgsm' or 'pgd': train on perturbed embeddings too
    epsilon: float = 0.01  # L-infinity radius of the perturbation (embeddings are ~1/sqrt(D))
    pgd_steps: int = 3
    pgd_step_size: float = 0.005
    weight: float = 0.5  # objective = (1 - weight) * clean + weight * adversarial
    eval_attack: Attack = "none"  # 'fgsm' or 'pgd': also report eval_adv_loss under attack
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
    # How epsilon is computed (bigjax/privacy.py): 'rdp' (Renyi DP, the classic bound) or
    # 'pld' (privacy loss distributions: tighter, so less noise for the same target epsilon).
    accountant: DpAccountant = "rdp"
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
    nan_policy: NanPolicy = "error"  # on a non-finite loss/grad: 'error', 'skip' or 'rollback'
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
    # Per-platform tuning (bigjax/mesh.py): the config file's `platforms` table as JSON
    # until the devices are known; then '' and `platform` names the entry that was applied.
    platforms: str = ""
    platform: str = ""

    @property
    def data_seed(self) -> int:
        return self.seed if self.data.seed < 0 else self.data.seed
