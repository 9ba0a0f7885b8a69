"""`bigjax convert`: Hugging Face <-> bigjax for Llama and GPT-2, checked against transformers
(PyTorch, CPU) itself on randomly initialised models of several shapes."""

import dataclasses
import json
import os
import re
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from bigjax import convert, hf, models, tensorfile
from bigjax.checkpoint import CheckpointError, param_layout
from bigjax.cli import main, open_run
from bigjax.train import train
from bigjax.tree import flatten

try:
    import torch
    import transformers
except ImportError:  # CI installs both (.ci/run); elsewhere these tests skip
    torch = transformers = None

needs_torch = pytest.mark.skipif(
    torch is None and os.environ.get("CI") != "true",
    reason="needs torch and transformers (pip install torch==2.13.0 transformers)",
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # < the 48 test positions: every band is used
}
SHAPES = {
    "llama-gqa": ("llama", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=300)),
    "llama-tied-bias-llama3": ("llama", dict(hidden_size=48, intermediate_size=80,
                                             num_hidden_layers=3, num_attention_heads=6,
                                             num_key_value_heads=6, head_dim=16, vocab_size=259,
                                             tie_word_embeddings=True, attention_bias=True,
                                             mlp_bias=True, rope_parameters=LLAMA3_ROPE)),
    "llama-mqa-linear": ("llama", dict(hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=1, vocab_size=272, rms_norm_eps=1e-5,
                                       rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                        "rope_theta": 10000.0})),
    # transformers' Mixtral: 4 experts, 2 a token (imported as a dropless Llama MoE)
    "mixtral": ("mixtral", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=280,
                                num_local_experts=4, num_experts_per_tok=2)),
    "gpt2-tied": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=128)),
    "gpt2-untied": ("gpt2", dict(n_embd=48, n_layer=3, n_head=3, n_inner=100, vocab_size=259,
                                 n_positions=64, tie_word_embeddings=False)),
}  # fmt: skip


def _hf_model(family: str, kwargs: dict, seed: int = 0):
    """A transformers model with every parameter random (norm scales and biases too, so a
    swapped or transposed tensor shows), in eval mode, f32, eager attention."""
    torch.manual_seed(seed)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    elif family == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**kwargs))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    model.config._attn_implementation = "eager"
    return model.eval()


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


def _bigjax_logits(run_dir, tokens: np.ndarray) -> np.ndarray:
    # open_run: this machine's 8 devices, parameters FSDP-sharded over them
    with open_run(str(run_dir), [], "test") as (prog, params, _):
        model = nnx.merge(prog.graphdef, params)
        b, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length), (b, length))
        return np.asarray(model(jnp.asarray(tokens), jnp.ones((b, length), jnp.int32), positions))


def _tokens(vocab: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (2, 48))


@pytest.mark.slow
@needs_torch
@pytest.mark.parametrize("name", list(SHAPES))
def test_import_matches_transformers_and_export_round_trips(name, tmp_path, capsys):
    family, kwargs = SHAPES[name]
    hf_model = _hf_model(family, kwargs)
    # The first shape is saved in shards, as large checkpoints are.
    shard = "60KB" if name == "llama-gqa" else "1GB"
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size=shard)
    sharded = (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert sharded == (name == "llama-gqa")

    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    printed = capsys.readouterr()
    assert f"imported {'llama' if family == 'mixtral' else family}" in printed.out
    assert "convert: import [####################] 100% 3/3 stages" in printed.err
    tokens = _tokens(kwargs["vocab_size"])
    ref = _hf_logits(hf_model, tokens)
    got = _bigjax_logits(tmp_path / "run", tokens)
    assert ref.std() > 0.1  # logits 1000x the bound: a wrong tensor could not hide
    # f32 on both sides; only summation order differs (measured ~1e-6); the bound.
    assert np.abs(got - ref).max() <= 1e-4

    # Export the imported run: every tensor comes back bit for bit, under transformers' names.
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    back = tensorfile.read_dir(tmp_path / "back")
    # as saved (Mixtral: the Hub's per-expert tensors; tied lm_head: not saved)
    original = tensorfile.read_dir(tmp_path / "hf")
    assert sorted(back) == sorted(original)
    for k, v in original.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


@pytest.mark.slow
@needs_torch
@pytest.mark.parametrize(
    "family, model",
    [
        ("llama", dict(num_kv_heads=2, rope_scaling="llama3", rope_factor=4.0,
                       rope_original_max_positions=16)),
        ("gpt2", dict(family="gpt2", num_kv_heads=0, max_positions=96, tie_embeddings=False)),
        # trained dropless with 4 experts: exported as Mixtral
        ("mixtral", dict(num_kv_heads=2, num_experts=4, experts_per_token=2,
                         moe_dispatch="dropless")),
    ],
)  # fmt: skip
def test_trained_run_exports_to_from_pretrained_with_the_same_logits(family, model, tmp_path):
    cfg = tiny_config(num_steps=3, model={"size": "tiny", **model})
    train(cfg, tmp_path / "run")
    out = tmp_path / "hf"
    args = ["convert", str(tmp_path / "run"), str(out), "--max-shard-size", "300KB"]
    assert main(args) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    names = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel",
             "mixtral": "MixtralForCausalLM"}  # fmt: skip
    assert type(hf_model).__name__ == names[family]
    tokens = _tokens(cfg.model.vocab_size)
    ref = _hf_logits(hf_model.eval(), tokens)
    got = _bigjax_logits(tmp_path / "run", tokens)
    assert np.abs(got - ref).max() <= 1e-4  # f32 both sides, as above

    # bf16 export: half the bytes, and transformers reads the dtype from config.json
    assert (
        main(["convert", str(tmp_path / "run"), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    )
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16


@needs_torch
@pytest.mark.slow
def test_an_export_into_an_earlier_one_replaces_its_weights_whole(tmp_path, capsys):
    # Run a exported as one file, then run b (another model) sharded into the same directory:
    # a.safetensors left beside b's shards was what transformers loaded, silently a's weights.
    for name, steps in (("a", 1), ("b", 3)):
        train(tiny_config(num_steps=steps, optim={"lr": 1e-2}), tmp_path / name)
    out = tmp_path / "hf"
    assert main(["convert", str(tmp_path / "a"), str(out)]) == 0
    (out / "tokenizer.json").write_text("{}")  # what a user puts beside an export: kept
    assert main(["convert", str(tmp_path / "b"), str(out), "--max-shard-size", "300KB"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" not in names and "tokenizer.json" in names
    assert names - {"tokenizer.json"} == {"config.json", "model.safetensors.index.json"} | set(
        json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()
    )
    tokens = _tokens(tiny_config().model.vocab_size)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    got = _hf_logits(hf_model.eval(), tokens)
    assert np.abs(got - _bigjax_logits(tmp_path / "b", tokens)).max() <= 1e-4  # b's, as above
    assert np.abs(got - _bigjax_logits(tmp_path / "a", tokens)).max() > 1e-2
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    # through a link to the export directory (say, on another disk): the link stays a link
    (tmp_path / "link").symlink_to(out)
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "link")]) == 0
    assert (tmp_path / "link").is_symlink() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    # a directory that is no export (it holds folders: a run) is refused, untouched
    assert main(["convert", str(tmp_path / "b"), str(tmp_path / "a")]) == 2
    assert "holds folders (checkpoints" in capsys.readouterr().err
    assert (tmp_path / "a" / "checkpoints").is_dir() and not (
        tmp_path / "a" / "model.safetensors"
    ).exists()


@pytest.mark.slow
def test_imported_model_fine_tunes_and_refuses_to_resume_as_a_run(tmp_path):
    # A GPT-2 checkpoint written with bigjax's own safetensors writer (no torch needed).
    gpt2 = {"size": "tiny", "family": "gpt2", "max_positions": 64, "num_kv_heads": 0}
    cfg = tiny_config(num_steps=2, model=gpt2, optim={"lr": 1e-12})
    _, abstract = models.abstract(cfg.model, cfg.mesh.rules)
    rng = np.random.default_rng(0)
    params = {
        path: (rng.normal(size=shape) * 0.05).astype(np.float32)
        for path, shape in param_layout(nnx.to_pure_dict(abstract)).items()
    }
    src = tmp_path / "hf"
    tensorfile.write_dir(src, hf.to_hf(cfg.model, params), 10**9)
    (src / "config.json").write_text(json.dumps(hf.hf_config(cfg.model, 64, "float32")))
    assert main(["convert", str(src), str(tmp_path / "imported")]) == 0

    # Resuming the imported directory itself as a run is refused, naming the fix.
    with pytest.raises(CheckpointError, match="parameters only.*init_from"):
        train(cfg, tmp_path / "imported")

    # Fine-tuning starts from the imported weights: at lr 1e-12 two steps leave them as
    # imported (AdamW moves each weight by ~lr per step), unlike a fresh initialisation.
    init = dataclasses.replace(cfg.checkpoint, init_from=str(tmp_path / "imported"))
    train(dataclasses.replace(cfg, checkpoint=init), tmp_path / "tuned")
    with open_run(str(tmp_path / "tuned"), [], "test") as (_, tuned, step):
        tuned = {k: np.asarray(v) for k, v in flatten(tuned).items()}
    assert step == 2 and sorted(tuned) == sorted(params)
    for k, v in params.items():
        np.testing.assert_allclose(tuned[k], v, atol=1e-9, err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, field, value",
    [("llama", "tie_word_embeddings", "false"), ("llama", "attention_bias", 0),
     ("gpt2", "tie_word_embeddings", "true"), ("gpt2", "scale_attn_weights", "false")],
)  # fmt: skip
def test_a_flag_that_is_not_a_json_boolean_is_refused(family, field, value):
    # bool("false") is True: a tied head read from a string imported the run without its
    # trained output layer, with no error
    gpt2 = {"family": "gpt2", "max_positions": 64, "num_kv_heads": 0}
    m = tiny_config(model=gpt2 if family == "gpt2" else {}).model
    config = hf.hf_config(m, 64, "float32")
    assert hf.model_fields({**config, field: None})  # absent or null: transformers' default
    with pytest.raises(hf.ConvertError, match=f"{field}={value!r}, expected true or false"):
        hf.model_fields({**config, field: value})


@pytest.mark.parametrize(
    "change, error",
    [({"rms_norm_eps": "x"}, "rms_norm_eps='x', expected a finite number"),
     ({"rope_parameters": {"rope_type": "linear", "factor": "8"}},
      "rope_parameters.factor='8', expected a finite number"),
     ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
      "rope_parameters.low_freq_factor is missing"),
     ({"rope_parameters": [1, 2]}, r"rope_parameters=\[1, 2\], expected an object"),
     ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
     ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5: bigjax rotates whole heads"),
     ({"hidden_size": "64"}, "hidden_size='64', expected a whole number >= 1"),
     ({"num_attention_heads": 0}, "num_attention_heads=0, expected a whole number >= 1"),
     ({"num_hidden_layers": 2.5}, "num_hidden_layers=2.5, expected a whole number >= 1"),
     ({"vocab_size": float("inf")}, "vocab_size=inf, expected a whole number >= 1"),
     ({"intermediate_size": None}, "intermediate_size is missing"),
     ({"vocab_size": 10**400}, r"vocab_size=10{11}\.\.\. \(a huge number\), expected a whole"),
     ({"rms_norm_eps": float("inf")}, "rms_norm_eps=inf, expected a finite number")],
)  # fmt: skip
def test_a_malformed_or_foreign_field_is_refused_naming_it(change, error):
    # float("abc") ended the import with "ValueError: could not convert string to float", a
    # half-rotated head (transformers rotates partial_rotary_factor of it) imported as a fully
    # rotated one, and a yarn `rope_scaling` beside a default `rope_parameters` was dropped
    config = hf.hf_config(tiny_config().model, 64, "float32")
    defaults = hf.model_fields({**config, "rms_norm_eps": None, "num_key_value_heads": None})
    assert (defaults["norm_eps"], defaults["num_kv_heads"]) == (1e-6, config["num_attention_heads"])
    assert hf.model_fields({**config, "vocab_size": 512.0})["vocab_size"] == 512  # a whole number
    with pytest.raises(hf.ConvertError, match=error):
        hf.model_fields({**config, **change})


def test_rope_scaling_wins_over_rope_parameters_as_in_transformers():
    # A file with both (an older `rope_scaling` added to a transformers 5 file): transformers
    # reads `rope_scaling or rope_parameters`, the top-level rope_theta filling it in.
    config = {**hf.hf_config(tiny_config().model, 64, "float32"), "rope_theta": 500000.0,
              "rope_scaling": {"rope_type": "linear", "factor": 2.0}}  # fmt: skip
    fields = hf.model_fields(config)
    assert (fields["rope_scaling"], fields["rope_factor"], fields["rope_theta"]) == (
        "linear", 2.0, 500000.0)  # fmt: skip
    if transformers is not None:  # the reference itself, where it is installed
        rope = transformers.LlamaConfig.from_dict(config).rope_parameters
        assert (rope["rope_type"], rope["factor"], rope["rope_theta"]) == ("linear", 2.0, 500000.0)


def test_weights_beside_a_config_without_model_type_are_not_taken_for_a_run(tmp_path, capsys):
    # they were read as a bigjax run directory: "no checkpoint ...: train the run first"
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"hidden_size": 64}))
    tensorfile.write_dir(src, {"lm_head.weight": np.zeros((4, 4), np.float32)}, 10**9)
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "config.json has no model_type" in err and "llama, mixtral, gpt2" in err, err
    assert not (tmp_path / "out").exists()


def test_bad_inputs_name_the_problem(tmp_path, capsys):
    # A pickle-only directory: never loaded, and the error says why.
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not loaded")
    gpt2 = {"size": "tiny", "family": "gpt2", "max_positions": 64, "num_kv_heads": 0}
    cfg = tiny_config(model=gpt2)
    config = hf.hf_config(cfg.model, 64, "float32")
    (tmp_path / "pickled" / "config.json").write_text(json.dumps(config))
    assert main(["convert", str(tmp_path / "pickled"), str(tmp_path / "x")]) == 2
    assert "pickles are never loaded" in capsys.readouterr().err

    # Another architecture.
    (tmp_path / "mistral").mkdir()
    (tmp_path / "mistral" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    assert main(["convert", str(tmp_path / "mistral"), str(tmp_path / "y")]) == 2
    assert "model_type='mistral' is not supported" in capsys.readouterr().err

    # Weights that do not match config.json (a layer too many), and a truncated file.
    _, abstract = models.abstract(cfg.model, cfg.mesh.rules)
    params = {
        p: np.zeros(s, np.float32) for p, s in param_layout(nnx.to_pure_dict(abstract)).items()
    }
    tensors = hf.to_hf(cfg.model, params)
    (tmp_path / "deeper").mkdir()
    tensorfile.write_dir(tmp_path / "deeper", tensors, 10**9)
    (tmp_path / "deeper" / "config.json").write_text(json.dumps({**config, "n_layer": 1}))
    assert main(["convert", str(tmp_path / "deeper"), str(tmp_path / "z")]) == 2
    assert "no place in the model" in capsys.readouterr().err
    blob = tmp_path / "deeper" / "model.safetensors"
    blob.write_bytes(blob.read_bytes()[:-100])
    (tmp_path / "deeper" / "config.json").write_text(json.dumps(config))
    assert main(["convert", str(tmp_path / "deeper"), str(tmp_path / "w")]) == 2
    assert "do not fit its size or the file" in capsys.readouterr().err

    # A run whose architecture Hugging Face's GPT-2 cannot express.
    run = tiny_config(num_steps=1, model={"family": "gpt2", "max_positions": 64})
    train(run, tmp_path / "gqa")  # tiny has 2 KV heads for 4 query heads
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "gqa"), str(tmp_path / "v")]) == 2
    assert "num_kv_heads=2" in capsys.readouterr().err


def _tiny_llama_tensors() -> tuple:
    """tiny_config's Llama and its weights (all 0.02) as Hugging Face tensors."""
    cfg = tiny_config(model={"family": "llama"})
    _, abstract = models.abstract(cfg.model, cfg.mesh.rules)
    layout = param_layout(nnx.to_pure_dict(abstract))
    params = {p: np.full(s, 0.02, np.float32) for p, s in layout.items()}
    return cfg, hf.to_hf(cfg.model, params)


def test_weights_with_a_nan_or_an_infinity_are_refused_naming_the_tensor(tmp_path, capsys):
    # a damaged file or a model saved after it diverged was imported without a word: the
    # NaN showed up only as a NaN loss (fine-tuning) or empty generations
    cfg, tensors = _tiny_llama_tensors()
    name = "model.layers.1.mlp.down_proj.weight"
    for value, shown in ((np.nan, "nan"), (-np.inf, "-inf")):
        broken = {**tensors, name: tensors[name].copy()}
        broken[name].reshape(-1)[[70, 5000]] = value
        src = tmp_path / f"hf-{shown}"
        src.mkdir()
        tensorfile.write_dir(src, broken, 10**9)
        (src / "config.json").write_text(json.dumps(hf.hf_config(cfg.model, 64, "float32")))
        assert main(["convert", str(src), str(tmp_path / f"run-{shown}")]) == 2
        err = capsys.readouterr().err
        said = f"{src}: tensor '{name}' holds 2 non-finite value(s) (the first, at flat index "
        assert f"{said}70, is {shown}); the file is damaged" in err, err
        assert not (tmp_path / f"run-{shown}").exists()
    # blocks: the count and the first index hold across block boundaries
    flat = np.zeros(100, np.float32)
    flat[[3, 40, 99]] = np.nan
    with pytest.raises(hf.ConvertError, match=r"holds 3 non-finite .* flat index 3, is nan"):
        convert.check_finite({"w": flat.reshape(10, 10)}, tmp_path, block=16)


def test_weights_stored_as_integers_are_refused_naming_the_tensor(tmp_path, capsys):
    # an I32 (or I8, as bitsandbytes keeps its 8-bit weights) tensor where a weight belongs was
    # cast to float and imported without a word: a model of raw integer codes, all finite
    cfg, tensors = _tiny_llama_tensors()
    name = "model.layers.0.self_attn.q_proj.weight"
    for dtype, shown in ((np.int32, "I32"), (np.int8, "I8"), (np.bool_, "BOOL")):
        src = tmp_path / f"hf-{shown}"
        src.mkdir()
        tensorfile.write_dir(src, {**tensors, name: tensors[name].astype(dtype)}, 10**9)
        (src / "config.json").write_text(json.dumps(hf.hf_config(cfg.model, 64, "float32")))
        assert main(["convert", str(src), str(tmp_path / f"run-{shown}")]) == 2
        err = capsys.readouterr().err
        assert f"{src}: tensor '{name}' is stored as {shown}, not floating point" in err, err
        assert not (tmp_path / f"run-{shown}").exists()
    # every float dtype a checkpoint is saved in imports
    convert.check_floats({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}, src)
    convert.check_floats({"a": np.zeros(2, np.float16), "b": np.zeros(2, np.float64)}, src)


@pytest.mark.slow
def test_finetune_config_starts_from_an_imported_model_with_lora(tmp_path):
    # An imported GPT-2 (written with bigjax's own writer), fine-tuned with LoRA through the
    # shipped configs/finetune.py, as a user types it.
    import subprocess
    import sys

    gpt2 = {"size": "tiny", "family": "gpt2", "max_positions": 64, "num_kv_heads": 0}
    cfg = tiny_config(model=gpt2)
    _, abstract = models.abstract(cfg.model, cfg.mesh.rules)
    rng = np.random.default_rng(0)
    params = {
        p: (rng.normal(size=s) * 0.05).astype(np.float32)
        for p, s in param_layout(nnx.to_pure_dict(abstract)).items()
    }
    tensorfile.write_dir(tmp_path / "hf", hf.to_hf(cfg.model, params), 10**9)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf.hf_config(cfg.model, 64, "float32")))
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "imported")]) == 0
    r = subprocess.run(
        [sys.executable, "-m", "bigjax.cli", "train", "--config",
         f"configs/finetune.py:{tmp_path / 'imported'}", "--workdir", str(tmp_path / "ft"),
         "--config.num_steps=3", "--config.finetune.lora_rank=4",
         "--config.data.batch_size=8"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"initialised from {tmp_path / 'imported'} at its step 0 (its parameters" in r.stdout
    assert re.search(r"[\d,]+ parameters \([\d,]+ trainable\)", r.stdout)  # LoRA: a few
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["complete"] and summary["step"] == 3


@pytest.mark.slow
@needs_torch
def test_served_log_probabilities_of_an_imported_model_equal_transformers(tmp_path):
    # What `bigjax serve` reports with echo (the engine's cached prefill) for a model imported
    # from Hugging Face, against transformers' own forward pass on the same ids.
    import threading

    from bigjax.serving.engine import Engine, Finished, Params, PromptScored, Sequence_

    family, kwargs = SHAPES["llama-gqa"]
    hf_model = _hf_model(family, kwargs)
    hf_model.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    tokens = _tokens(kwargs["vocab_size"])[0]
    logp = torch.log_softmax(torch.as_tensor(_hf_logits(hf_model, tokens[None])[0]), -1).numpy()
    want = logp[np.arange(len(tokens) - 1), tokens[1:]]
    got, done = [], threading.Event()

    def emit(event):
        got.append(event)
        if isinstance(event, Finished):
            done.set()

    with open_run(str(tmp_path / "run"), [], "test") as (prog, params, _):
        engine = Engine(prog.graphdef, params, prog.cfg.mesh.rules, slots=2, max_len=64,
                        max_waiting=4, mesh=prog.mesh)  # fmt: skip
        engine.warm_up()
        engine.start()
        engine.submit([Sequence_(tokens.tolist(), Params(max_tokens=0, prompt_scores=True), emit)])
        assert done.wait(60)
        engine.stop()
    scores = next(e for e in got if isinstance(e, PromptScored))
    # f32 on both sides, summation order differs: the bound for imported models
    assert np.abs(np.asarray(scores.logprobs) - want).max() <= 1e-4
