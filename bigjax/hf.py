"""Hugging Face <-> bigjax for the Llama (and Mixtral) and GPT-2 families: config.json and
safetensors weights.

Each family is a table of `Tensor` rules. One Hugging Face tensor is the concatenation, along its
output axis, of pieces of bigjax parameters: GPT-2's fused `c_attn` is bigjax's q plus both halves
of the fused kv; Llama's `k_proj` is the k half of that kv. The same table converts both ways,
so import and export cannot drift apart. Nothing here needs torch or transformers; the tests
check both directions against transformers itself.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from bigjax.config import ModelConfig
from bigjax.errors import UsageError

FAMILIES = ("llama", "gpt2")  # a Llama with experts is transformers' Mixtral
MODEL_TYPES = ("llama", "mixtral", "gpt2")  # config.json's model_type values that import


class ConvertError(UsageError, ValueError):
    """A model that cannot be converted; the message names what differs and the fix."""


@dataclasses.dataclass(frozen=True)
class Piece:
    """A bigjax parameter, or one slice of a fused one, as a matrix [inputs, outputs]."""

    path: str  # under blocks/ for per-layer tensors, e.g. "attn/kv_DGCK"
    part: tuple[int, int] | None = None  # (axis, index) into a fused parameter (one layer)
    n_in: int = 1  # leading input axes (after taking the parts); 0 for vectors
    expert: int | None = None  # index into the leading [E] axis of an MoE parameter

    @property
    def taken(self) -> dict[int, int]:
        """axis -> index of the one layer's array that this piece takes."""
        return ({} if self.part is None else {self.part[0]: self.part[1]}) | (
            {} if self.expert is None else {0: self.expert}
        )


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One Hugging Face tensor. `layout`: 'linear' (torch Linear, [out, in]), 'conv1d'
    (GPT-2's Conv1D, [in, out]), 'vector' (1-D) or 'table' (an embedding, [rows, D])."""

    hf: str  # "{i}" stands for the layer
    pieces: tuple[Piece, ...]
    layout: str


def _t(hf: str, layout: str, *pieces: Piece | str) -> Tensor:
    return Tensor(hf, tuple(Piece(p) if isinstance(p, str) else p for p in pieces), layout)


def _vec(path: str, part: tuple[int, int] | None = None) -> Piece:
    return Piece(path, part, n_in=0)


def _llama_rules(m: ModelConfig) -> tuple[list[Tensor], list[Tensor]]:
    """(per-layer, global) tensors of transformers' LlamaForCausalLM."""
    L = "model.layers.{i}."
    layer = [
        _t(L + "self_attn.q_proj.weight", "linear", "attn/q_DHK"),
        _t(L + "self_attn.k_proj.weight", "linear", Piece("attn/kv_DGCK", (2, 0))),
        _t(L + "self_attn.v_proj.weight", "linear", Piece("attn/kv_DGCK", (2, 1))),
        _t(L + "self_attn.o_proj.weight", "linear", Piece("attn/o_HKD", n_in=2)),
        *(_mixtral_experts(L, m.num_experts) if m.num_experts else _swiglu(L)),
        _t(L + "input_layernorm.weight", "vector", _vec("attn_norm/scale")),
        _t(L + "post_attention_layernorm.weight", "vector", _vec("mlp_norm/scale")),
    ]
    if m.use_bias:  # transformers' attention_bias and mlp_bias
        layer += [
            _t(L + "self_attn.q_proj.bias", "vector", _vec("attn/q_bias_HK")),
            _t(L + "self_attn.k_proj.bias", "vector", _vec("attn/kv_bias_GCK", (1, 0))),
            _t(L + "self_attn.v_proj.bias", "vector", _vec("attn/kv_bias_GCK", (1, 1))),
            _t(L + "self_attn.o_proj.bias", "vector", _vec("attn/o_bias_D")),
            _t(L + "mlp.gate_proj.bias", "vector", _vec("mlp/gate_up_bias_FC", (1, 0))),
            _t(L + "mlp.up_proj.bias", "vector", _vec("mlp/gate_up_bias_FC", (1, 1))),
            _t(L + "mlp.down_proj.bias", "vector", _vec("mlp/down_bias_D")),
        ]
    top = [
        _t("model.embed_tokens.weight", "table", "embed/table_VD"),
        _t("model.norm.weight", "vector", _vec("final_norm/scale")),
    ]
    if not m.tie_embeddings:
        top.append(_t("lm_head.weight", "linear", "lm_head_DV"))
    return layer, top


def _swiglu(L: str) -> list[Tensor]:
    return [
        _t(L + "mlp.gate_proj.weight", "linear", Piece("mlp/gate_up_DFC", (2, 0))),
        _t(L + "mlp.up_proj.weight", "linear", Piece("mlp/gate_up_DFC", (2, 1))),
        _t(L + "mlp.down_proj.weight", "linear", "mlp/down_FD"),
    ]


def _mixtral_experts(L: str, num_experts: int) -> list[Tensor]:
    """Mixtral as saved on the Hub: the router [E, D] and each expert's w1 (gate), w3 (up)
    and w2 (down), slices of the stacked [E, D, F, 2] / [E, F, D] parameters."""
    X = L + "block_sparse_moe."
    tensors = [_t(X + "gate.weight", "linear", "mlp/router_DE")]
    for e in range(num_experts):
        tensors += [
            _t(X + f"experts.{e}.w1.weight", "linear", Piece("mlp/gate_up_EDFC", (3, 0), 1, e)),
            _t(X + f"experts.{e}.w3.weight", "linear", Piece("mlp/gate_up_EDFC", (3, 1), 1, e)),
            _t(X + f"experts.{e}.w2.weight", "linear", Piece("mlp/down_EFD", None, 1, e)),
        ]
    return tensors


def _gpt2_rules(m: ModelConfig) -> tuple[list[Tensor], list[Tensor]]:
    """(per-layer, global) tensors of transformers' GPT2LMHeadModel."""
    L = "transformer.h.{i}."
    k, v = Piece("attn/kv_DGCK", (2, 0)), Piece("attn/kv_DGCK", (2, 1))
    layer = [
        _t(L + "ln_1.weight", "vector", _vec("attn_norm/scale")),
        _t(L + "ln_1.bias", "vector", _vec("attn_norm/bias")),
        _t(L + "attn.c_attn.weight", "conv1d", "attn/q_DHK", k, v),
        _t(
            L + "attn.c_attn.bias",
            "vector",
            _vec("attn/q_bias_HK"),
            _vec("attn/kv_bias_GCK", (1, 0)),
            _vec("attn/kv_bias_GCK", (1, 1)),
        ),
        _t(L + "attn.c_proj.weight", "conv1d", Piece("attn/o_HKD", n_in=2)),
        _t(L + "attn.c_proj.bias", "vector", _vec("attn/o_bias_D")),
        _t(L + "ln_2.weight", "vector", _vec("mlp_norm/scale")),
        _t(L + "ln_2.bias", "vector", _vec("mlp_norm/bias")),
        _t(L + "mlp.c_fc.weight", "conv1d", "mlp/up_DF"),
        _t(L + "mlp.c_fc.bias", "vector", _vec("mlp/up_bias_F")),
        _t(L + "mlp.c_proj.weight", "conv1d", "mlp/down_FD"),
        _t(L + "mlp.c_proj.bias", "vector", _vec("mlp/down_bias_D")),
    ]
    top = [
        _t("transformer.wte.weight", "table", "embed/table_VD"),
        _t("transformer.wpe.weight", "table", "pos_table_PD"),
        _t("transformer.ln_f.weight", "vector", _vec("final_norm/scale")),
        _t("transformer.ln_f.bias", "vector", _vec("final_norm/bias")),
    ]
    if not m.tie_embeddings:
        top.append(_t("lm_head.weight", "linear", "lm_head_DV"))
    return layer, top


RULES = {"llama": _llama_rules, "gpt2": _gpt2_rules}

# ----------------------------------------------------------------------------- configs


def _require(m: ModelConfig, family: str, **expected: Any) -> None:
    wrong = [
        f"model.{k}={getattr(m, k)!r} (needs {v!r})"
        for k, v in expected.items()
        if getattr(m, k) != v
    ]
    if wrong:
        how = f" (model.family={family!r} sets them)" if family in FAMILIES else ""
        raise ConvertError(
            f"this model has no Hugging Face {family} equivalent: {', '.join(wrong)}. Train "
            f"with those settings{how} to export it."
        )


def hf_config(m: ModelConfig, seq_len: int, dtype: str) -> dict[str, Any]:
    """config.json for transformers' LlamaForCausalLM or GPT2LMHeadModel."""
    if m.family == "llama":
        _require(m, "llama", positions="rope", mlp="swiglu", norm="rmsnorm")
        rope: dict[str, Any] = {"rope_type": m.rope_scaling, "rope_theta": m.rope_theta}
        if m.rope_scaling != "default":
            rope["factor"] = m.rope_factor
        if m.rope_scaling == "llama3":
            rope |= {
                "low_freq_factor": m.rope_low_freq_factor,
                "high_freq_factor": m.rope_high_freq_factor,
                "original_max_position_embeddings": m.rope_original_max_positions,
            }
        extended = m.rope_original_max_positions * m.rope_factor
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **_mixtral_config(m),
            "hidden_size": m.d_model,
            "intermediate_size": m.d_ff,
            "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_heads,
            "num_key_value_heads": m.kv_heads,
            "head_dim": m.dim_per_head,
            "vocab_size": m.vocab_size,
            "hidden_act": "silu",
            "rms_norm_eps": m.norm_eps,
            "attention_bias": m.use_bias,
            "mlp_bias": m.use_bias,
            "tie_word_embeddings": m.tie_embeddings,
            "max_position_embeddings": int(extended if m.rope_scaling == "llama3" else seq_len),
            "rope_parameters": rope,
            "dtype": dtype,
        }
    if m.family == "gpt2":
        _require(m, "gpt2", positions="learned", mlp="gelu", norm="layernorm", use_bias=True)
        if m.kv_heads != m.num_heads or m.dim_per_head * m.num_heads != m.d_model:
            raise ConvertError(
                f"GPT-2 has one KV head per query head and head_dim = d_model / num_heads; "
                f"this model has num_kv_heads={m.kv_heads}, head_dim={m.dim_per_head}. Train "
                "with model.num_kv_heads=0 and model.head_dim=0 to export it."
            )
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": m.d_model,
            "n_layer": m.num_layers,
            "n_head": m.num_heads,
            "n_inner": m.d_ff,
            "n_positions": m.max_positions,
            "vocab_size": m.vocab_size,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": m.norm_eps,
            "tie_word_embeddings": m.tie_embeddings,
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "dtype": dtype,
        }
    raise ConvertError(f"model.family={m.family!r} has no Hugging Face export; use {FAMILIES}.")


def _mixtral_config(m: ModelConfig) -> dict[str, Any]:
    """config.json's Mixtral fields (and name) for a Llama with experts; {} without."""
    if not m.num_experts:
        return {}
    _require(m, "mixtral", moe_gating="softmax", moe_shared_experts=0, moe_route_scale=1.0,
             moe_bias_rate=0.0)  # fmt: skip
    if m.experts_per_token == 1:
        raise ConvertError(
            "Mixtral renormalises the top-k weights, so its k=1 gate is always 1 and bigjax's "
            "(Switch) is the raw probability: export needs model.experts_per_token >= 2."
        )
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": m.num_experts,
        "num_experts_per_tok": m.experts_per_token,
        "router_aux_loss_coef": m.moe_aux_weight,
        "sliding_window": None,
    }


def _rope_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE settings from transformers >= 5 (`rope_parameters`) or older (`rope_theta` +
    `rope_scaling`) config.json files. Where a file has both, `rope_scaling` wins, as in
    transformers (its config reads `rope_scaling or rope_parameters`)."""
    key = "rope_scaling" if hf.get("rope_scaling") is not None else "rope_parameters"
    rope = hf.get(key) or {}
    if not isinstance(rope, Mapping):
        raise ConvertError(f"config.json: {key}={rope!r}, expected an object.")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ConvertError(f"rope type {kind!r} is not supported; bigjax has linear and llama3.")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None and partial != 1:  # transformers rotates that share of a head
        raise ConvertError(f"partial_rotary_factor={partial!r}: bigjax rotates whole heads.")
    theta = _number(rope, "rope_theta", _number(hf, "rope_theta", 10000.0), key)
    out: dict[str, Any] = {"rope_theta": theta, "rope_scaling": kind}
    if kind != "default":
        out["rope_factor"] = _number(rope, "factor", None, key)
    if kind == "llama3":
        out["rope_low_freq_factor"] = _number(rope, "low_freq_factor", None, key)
        out["rope_high_freq_factor"] = _number(rope, "high_freq_factor", None, key)
        limit = _count(rope, "original_max_position_embeddings", None, key)
        out["rope_original_max_positions"] = limit
    return out


def _count(fields: Mapping[str, Any], key: str, default: int | None = None,
           within: str = "") -> int:  # fmt: skip
    """A size in config.json (layers, heads, widths): `_number`, whole and >= 1."""
    return int(_number(fields, key, default, within, whole=True))


def _number(fields: Mapping[str, Any], key: str, default: float | None, within: str = "",
            whole: bool = False) -> float:  # fmt: skip
    """A numeric field of config.json (of its `within` object): a JSON number, or `default`
    (transformers') where it is absent or null; anything else is refused naming the field
    (`float("abc")` said only "could not convert string to float", "128" // 4 named nothing)."""
    name, value = f"{within}.{key}" if within else key, fields.get(key)
    if value is None and default is not None:
        return default
    if value is None:
        raise ConvertError(f"config.json: {name} is missing.")
    # finite and within float's range (10**400 made float() raise OverflowError)
    number = isinstance(value, int | float) and not isinstance(value, bool) and abs(value) < 1e300
    if not number or whole and not (value == int(value) and value >= 1):
        want = "a whole number >= 1" if whole else "a finite number"
        shown = repr(value) if len(repr(value)) < 40 else f"{repr(value)[:12]}... (a huge number)"
        raise ConvertError(f"config.json: {name}={shown}, expected {want}.")
    return float(value)


def _flag(hf: Mapping[str, Any], key: str, default: bool) -> bool:
    """A boolean field of config.json: true, false, or absent or null (transformers' default).
    Anything else is refused: `bool("false")` is True, and a tied head read from a string
    would silently drop the trained output layer."""
    value = hf.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    raise ConvertError(f"config.json: {key}={value!r}, expected true or false (a JSON boolean).")


def _dims(hf: Mapping[str, Any], family: str, heads: str, width: str, layers: str) -> dict:
    """The sizes every family names its own way, and the vocabulary."""
    num_heads, d_model = _count(hf, heads), _count(hf, width)
    return {"family": family, "d_model": d_model, "num_layers": _count(hf, layers),
            "num_heads": num_heads, "vocab_size": _count(hf, "vocab_size")}  # fmt: skip


def model_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """`model.*` config fields for a Hugging Face config.json."""
    kind = hf.get("model_type")
    if kind == "mixtral":
        if hf.get("sliding_window"):
            raise ConvertError(
                f"sliding_window={hf['sliding_window']}: bigjax attends to the "
                "whole sequence; only Mixtral configs without a window import."
            )
        if _count(hf, "num_experts_per_tok", 2) < 2:
            raise ConvertError(
                "Mixtral with one expert per token (its gate is always 1) has no "
                "bigjax equivalent; bigjax's k=1 gate is the raw probability."
            )
        fields = model_fields({**hf, "model_type": "llama", "mlp_bias": False})
        return fields | {
            "num_experts": _count(hf, "num_local_experts", 8),
            "experts_per_token": _count(hf, "num_experts_per_tok", 2),
            "moe_dispatch": "dropless",  # Mixtral drops no token
            "moe_aux_weight": _number(hf, "router_aux_loss_coef", 0.001),
        }
    if kind == "llama":
        if hf.get("hidden_act", "silu") != "silu":
            raise ConvertError(f"hidden_act={hf['hidden_act']!r}: bigjax's SwiGLU uses silu.")
        if _flag(hf, "attention_bias", False) != _flag(hf, "mlp_bias", False):
            raise ConvertError("attention_bias and mlp_bias differ; bigjax has one use_bias.")
        dims = _dims(hf, "llama", "num_attention_heads", "hidden_size", "num_hidden_layers")
        heads, width = dims["num_heads"], dims["d_model"]
        return dims | {
            "num_kv_heads": _count(hf, "num_key_value_heads", heads),
            "head_dim": _count(hf, "head_dim", width // heads),
            "d_ff": _count(hf, "intermediate_size"),
            "norm_eps": _number(hf, "rms_norm_eps", 1e-6),
            "use_bias": _flag(hf, "attention_bias", False),
            "tie_embeddings": _flag(hf, "tie_word_embeddings", False),
            **_rope_fields(hf),
        }
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConvertError(f"activation_function={act!r}: bigjax's GPT-2 uses tanh GELU.")
        if _flag(hf, "scale_attn_by_inverse_layer_idx", False) or _flag(
            hf, "reorder_and_upcast_attn", False
        ):
            raise ConvertError("GPT-2 attention variants (inverse layer scaling) unsupported.")
        if not _flag(hf, "scale_attn_weights", True):
            raise ConvertError("scale_attn_weights=false is not supported.")
        dims = _dims(hf, "gpt2", "n_head", "n_embd", "n_layer")
        heads, width = dims["num_heads"], dims["d_model"]
        return dims | {
            "num_kv_heads": heads,
            "head_dim": width // heads,
            "d_ff": _count(hf, "n_inner", 4 * width),
            "max_positions": _count(hf, "n_positions"),
            "norm_eps": _number(hf, "layer_norm_epsilon", 1e-5),
            "tie_embeddings": _flag(hf, "tie_word_embeddings", True),
        }
    raise ConvertError(
        f"model_type={kind!r} is not supported; bigjax converts {', '.join(MODEL_TYPES)} "
        "(config.json's model_type)."
    )


# ----------------------------------------------------------------------------- tensors


def _piece(array: np.ndarray, p: Piece) -> np.ndarray:
    for axis, index in sorted(p.taken.items(), reverse=True):  # later axes first
        array = np.take(array, index, axis=axis)
    return array


def _piece_shape(shape: tuple[int, ...], p: Piece) -> tuple[int, ...]:
    return tuple(n for axis, n in enumerate(shape) if axis not in p.taken)


def _to_hf(t: Tensor, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    if t.layout == "table":
        return arrays[t.pieces[0].path]
    mats = []
    for p in t.pieces:
        a = _piece(arrays[p.path], p)
        mats.append(a.reshape(math.prod(a.shape[: p.n_in]), -1))  # [in, out]
    m = np.concatenate(mats, axis=1)
    return {"linear": m.T, "conv1d": m, "vector": m.reshape(-1)}[t.layout]


def _from_hf(
    t: Tensor, value: np.ndarray, shapes: Mapping[str, tuple[int, ...]], out: dict, dtype
) -> None:
    """Writes the pieces of HF tensor `value` into `out` (path -> array of `shapes`)."""
    if t.layout == "table":
        (p,) = t.pieces
        _check_shape(t.hf, value.shape, shapes[p.path])
        out[p.path] = np.asarray(value, dtype)
        return
    piece_shapes = [_piece_shape(shapes[p.path], p) for p in t.pieces]
    n_in = math.prod(piece_shapes[0][: t.pieces[0].n_in])
    widths = [math.prod(s[p.n_in :]) for s, p in zip(piece_shapes, t.pieces, strict=True)]
    expected = {"linear": (sum(widths), n_in), "conv1d": (n_in, sum(widths))}
    _check_shape(t.hf, value.shape, expected.get(t.layout, (sum(widths),)))
    m = {"linear": value.T, "conv1d": value, "vector": value.reshape(1, -1)}[t.layout]
    for p, s, block in zip(
        t.pieces, piece_shapes, np.split(m, np.cumsum(widths)[:-1], axis=1), strict=True
    ):
        block = np.asarray(block, dtype).reshape(s)
        if not p.taken:
            out[p.path] = block
        else:
            full = out.setdefault(p.path, np.zeros(shapes[p.path], dtype))
            index: list[slice | int] = [slice(None)] * full.ndim
            for axis, i in p.taken.items():
                index[axis] = i
            full[tuple(index)] = block


def _check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(got) != tuple(want):
        raise ConvertError(
            f"tensor {name} has shape {list(got)}, but config.json implies {list(want)}."
        )


def to_hf(m: ModelConfig, flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """bigjax parameters (path -> array, layers stacked on axis 0) -> Hugging Face tensors."""
    layer, top = RULES[m.family](m)
    out = {t.hf: _to_hf(t, flat) for t in top}
    blocks = {k[len("blocks/") :]: v for k, v in flat.items() if k.startswith("blocks/")}
    for i in range(m.num_layers):
        one = {k: v[i] for k, v in blocks.items()}
        out |= {t.hf.format(i=i): _to_hf(t, one) for t in layer}
    return out


def check_names(m: ModelConfig, tensors: Mapping[str, np.ndarray]) -> None:
    """Every tensor the model needs is there and every tensor has a place (tied lm_head
    copies aside); raises ConvertError naming the first few that do not."""
    layer, top = RULES[m.family](m)
    names = [t.hf for t in top] + [t.hf.format(i=i) for i in range(m.num_layers) for t in layer]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ConvertError(f"the checkpoint lacks {len(missing)} tensors: {missing[:6]}")
    unused = sorted(set(tensors) - set(names) - {"lm_head.weight"})
    if unused:
        raise ConvertError(
            f"{len(unused)} tensors of the checkpoint have no place in the model: {unused[:6]}. "
            "Does config.json match the weights?"
        )


def from_hf(
    m: ModelConfig, tensors: Mapping[str, np.ndarray], layout: Mapping[str, list[int]], dtype
) -> dict[str, np.ndarray]:
    """Hugging Face tensors -> bigjax parameters (path -> array) of the shapes in `layout`.
    Every parameter must be filled and every tensor used (tied lm_head copies aside)."""
    check_names(m, tensors)
    layer, top = RULES[m.family](m)
    shapes = {k: tuple(v) for k, v in layout.items()}
    out: dict[str, np.ndarray] = {}
    for t in top:
        _from_hf(t, tensors[t.hf], shapes, out, dtype)
    block_shapes = {
        k[len("blocks/") :]: v[1:] for k, v in shapes.items() if k.startswith("blocks/")
    }
    layers = []
    for i in range(m.num_layers):
        one: dict[str, np.ndarray] = {}
        for t in layer:
            _from_hf(t, tensors[t.hf.format(i=i)], block_shapes, one, dtype)
        layers.append(one)
    out |= {f"blocks/{k}": np.stack([one[k] for one in layers]) for k in block_shapes}
    if set(out) != set(shapes):
        raise ConvertError(f"parameters left unset: {sorted(set(shapes) - set(out))}")
    return out
