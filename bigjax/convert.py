"""`bigjax convert`: a Hugging Face model directory <-> a bigjax run directory.

Import writes a run directory (config.json and a parameters-only checkpoint at step 0) that
`bigjax generate`, `bigjax eval` and fine-tuning (`checkpoint.init_from`) open like any run.
Export writes config.json and safetensors (sharded above `max_shard_bytes`) that transformers'
`from_pretrained` loads (and, asked, the run's tokenizer for `AutoTokenizer`), as one
directory swapped into place when complete (bigjax/dirswap.py): an export into an earlier one
replaces its weights whole (a stale `model.safetensors` beside new shards would be what
transformers loads) and keeps the files a user put beside them (a tokenizer, a README).
The tensor mapping lives in `bigjax.hf`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from bigjax import checkpoint, errors, hf, models, progress, tensorfile, trained
from bigjax.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    from_configdict,
    to_dict,
)
from bigjax.data import dataset
from bigjax.data.tokenizer import HFTokenizer, Tokenizer, TokenizerError
from bigjax.dirswap import staging_dir, swap_in
from bigjax.serving.chat import find_template, template_dir
from bigjax.tree import flatten, unflatten

EXPORT_DTYPES = {
    "float32": np.float32,
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
}
# What an export writes; in a directory exported into before, these are the earlier export's.
EXPORTED = re.compile(r"config\.json|model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def read_config(path: Path) -> dict[str, Any]:
    """A config.json as a mapping, or a ConvertError naming the file."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise hf.ConvertError(f"{path}: unreadable JSON ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise hf.ConvertError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory: config.json with a `model_type`. Safetensors beside a
    config.json without one, and no checkpoints, are neither that nor a run: refused naming the
    field (taken for a run, they were told to train it first)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    if "model_type" in read_config(path / "config.json"):
        return True
    if any(path.glob("*.safetensors")) and not (path / "checkpoints").exists():
        raise hf.ConvertError(
            f"{path / 'config.json'} has no model_type: a Hugging Face config names its "
            f"architecture there (one of {', '.join(hf.MODEL_TYPES)})."
        )
    return False


def check_sizes(m: ModelConfig, tensors: dict[str, np.ndarray], dtype: np.dtype) -> None:
    """Before anything is allocated: the parameters config.json implies must be what the
    safetensors headers hold, and fit in this machine's memory (config.json and the weights
    may come from anywhere; a wrong or hostile layer count must not grow without bound)."""
    implied = models.PARAM_COUNT[m.family](m)
    held = sum(v.size for k, v in tensors.items() if k != "lm_head.weight" or not m.tie_embeddings)
    if implied != held:
        if m.num_layers <= len(tensors):  # few enough layers to list what does not match
            hf.check_names(m, tensors)
        raise hf.ConvertError(
            f"config.json implies {implied:,} parameters ({m.num_layers} layers, d_model "
            f"{m.d_model}, vocab {m.vocab_size}), the safetensors files hold {held:,}: they do "
            "not belong together."
        )
    need = 2 * implied * np.dtype(dtype).itemsize  # the converted copy and the stacked layers
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > available:
        raise hf.ConvertError(
            f"converting {implied:,} parameters needs about {need / 2**30:.1f} GiB of memory, "
            f"{available / 2**30:.1f} GiB are free here."
        )


def check_floats(tensors: dict[str, np.ndarray], src: Path) -> None:
    """Weights stored as integers or booleans are refused, naming the tensor: the import casts
    each tensor to the parameter dtype, so an 8-bit quantized checkpoint (bitsandbytes keeps
    `weight` as I8 beside its scales) or a dtype field damaged in a header would become a
    model of raw integer codes, every one finite, imported without a word."""
    floats = {"F64", "F32", "F16", "BF16"}  # bfloat16 (ml_dtypes) is no np.floating
    for name, tensor in tensors.items():
        if tensorfile.NAMES[tensor.dtype] not in floats:
            raise hf.ConvertError(
                f"{src}: tensor {name!r} is stored as {tensorfile.NAMES[tensor.dtype]}, not "
                "floating point; bigjax imports float weights (F64, F32, F16, BF16). A quantized "
                "checkpoint must be dequantized first (load it in transformers and save it with "
                "a float torch_dtype)."
            )


def check_finite(tensors: dict[str, np.ndarray], src: Path, block: int = 1 << 24) -> None:
    """A NaN or infinity in the weights (a damaged file, a model saved after it diverged) is
    refused, naming the tensor: every checkpoint bigjax writes is finite, and an imported one
    would show up only as a NaN loss or empty generations later. Read in blocks, so the check
    holds one block's mask at a time, not a copy of the model."""
    for name, tensor in tensors.items():
        flat = tensor.reshape(-1)
        bad, first = 0, -1
        for start in range(0, flat.size, block):
            mask = ~np.isfinite(flat[start : start + block])
            if mask.any():
                first = first if bad else start + int(mask.argmax())
                bad += int(mask.sum())
        if bad:
            raise hf.ConvertError(
                f"{src}: tensor {name!r} holds {bad:,} non-finite value(s) (the first, at flat "
                f"index {first:,}, is {flat[first]}); the file is damaged, or the model was "
                "saved after it diverged. bigjax imports finite weights only."
            )


def import_hf(src: str | Path, dst: str | Path, config: dict[str, Any]) -> TrainConfig:
    """Hugging Face directory `src` -> bigjax run directory `dst`. `config` holds extra
    settings for the run (nested dict, e.g. {"data": {"seq_len": 512}}); `model.*` comes from
    the Hugging Face config.json."""
    src, dst = Path(src), Path(dst)
    trained.check_new_run_dir(dst)  # before the weights are read
    raw = read_config(src / "config.json")
    try:
        fields = hf.model_fields(raw)
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise hf.ConvertError(
            f"{src / 'config.json'}: a field is missing or malformed ({type(e).__name__}: {e})"
        ) from None
    model = {**config.get("model", {}), **fields}
    data = dict(config.get("data", {}))
    if "max_positions" in model and "seq_len" not in data:  # fit the default to the table
        data["seq_len"] = min(DataConfig().seq_len, model["max_positions"])
    cfg = from_configdict({**config, "model": model, "data": data})
    bar = progress.Bar("convert: import", 3, "stages")
    tensors = tensorfile.read_dir(src)  # headers and memory maps only
    check_sizes(cfg.model, tensors, np.dtype(cfg.model.param_dtype))
    check_floats(tensors, src)
    check_finite(tensors, src)
    bar.advance(note=f"{len(tensors)} tensors found, all finite")
    _, abstract = models.abstract(cfg.model, cfg.mesh.rules)
    layout = checkpoint.param_layout(nnx.to_pure_dict(abstract))
    flat = hf.from_hf(cfg.model, tensors, layout, np.dtype(cfg.model.param_dtype))
    bar.advance(note="converted to bigjax's layout")
    tokenizer = model_tokenizer(src, cfg.model)
    trained.write_params_run(dst, to_dict(cfg), unflatten(flat), tokenizer,
                             model_template(src) if tokenizer else None,
                             imported_from=str(src.absolute()))  # fmt: skip
    bar.advance(note="checkpoint written")
    bar.close()
    return cfg


def model_tokenizer(src: Path, m: ModelConfig) -> Tokenizer | None:
    """The model's tokenizer.json, kept with the imported run so that generate, serve and
    eval read text as the model was trained to; None, with a note saying why, where there is
    none that bigjax can use (the run then reads text with its data's tokenizer)."""
    path = src / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        tokenizer = HFTokenizer(path.read_text(encoding="utf-8"))
        _ = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)  # parses it; needs an EOS
        if tokenizer.vocab_size > m.vocab_size:
            raise TokenizerError(f"it has {tokenizer.vocab_size} ids, the model {m.vocab_size}")
    except Exception as e:  # noqa: BLE001 - `tokenizers` raises plain Exception on bad JSON
        said = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        print(f"note: {path} is not kept with the run ({said}); it reads text with its data's "
              "tokenizer.", file=sys.stderr, flush=True)  # fmt: skip
        return None
    return tokenizer


def model_template(src: Path) -> str | None:
    """The model's chat template (chat_template.jinja, or in its tokenizer_config.json), kept
    with its tokenizer for `bigjax serve`; one that does not read is left, with a note."""
    try:
        return find_template(src)
    except ConfigError as e:
        print(f"note: {e} It is not kept with the run.", file=sys.stderr, flush=True)
        return None


def export_hf(
    cfg: TrainConfig,
    params: Any,
    dst: str | Path,
    dtype: str,
    max_shard_bytes: int,
    tokenizer: Tokenizer | None = None,
    workdir: Path | None = None,
) -> list[str]:
    """A run's parameters (a pure dict, possibly sharded) -> Hugging Face directory `dst`,
    with the run's `tokenizer` (and chat template: its data's, or the one kept in `workdir`)
    when one is given; returns the files written."""
    if dtype not in EXPORT_DTYPES:
        raise hf.ConvertError(f"--dtype {dtype!r}: use one of {list(EXPORT_DTYPES)}.")
    dst = Path(dst)
    carried = _carried(dst)  # before any work: a target that is no export is refused
    config = hf.hf_config(cfg.model, cfg.data.seq_len, dtype)  # raises if not representable
    extra = {} if tokenizer is None else tokenizer_files(tokenizer, cfg, workdir)
    if tokenizer is not None:  # what generate() stops at and pads with
        config |= {f"{k}_token_id": i for k, i in _specials(tokenizer).items()}
    bar = progress.Bar("convert: export", 3, "stages")
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten(params).items()}
    bar.advance(note="gathered to the host")
    tensors = {
        k: np.ascontiguousarray(v).astype(EXPORT_DTYPES[dtype])
        for k, v in hf.to_hf(cfg.model, flat).items()
    }
    bar.advance(note=f"{len(tensors)} tensors in {dtype}")
    staged = staging_dir(dst)
    try:
        files = tensorfile.write_dir(staged, tensors, max_shard_bytes)
        (staged / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name, text in extra.items():
            (staged / name).write_text(text, encoding="utf-8")
        for path in carried:  # a user's files; the run's own tokenizer replaces theirs
            if path.name not in extra:
                shutil.copy2(path, staged / path.name)
        swap_in(staged, dst)
    except BaseException as e:
        shutil.rmtree(staged, ignore_errors=True)
        errors.note_writing(e, dst)
        raise
    bar.advance(note=f"{len(files)} file(s) written")
    bar.close()
    return [*files, "config.json", *extra]


def tokenizer_files(
    tokenizer: Tokenizer, cfg: TrainConfig, workdir: Path | None = None
) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json: what `AutoTokenizer.from_pretrained` reads,
    giving the ids `bigjax generate` and `serve` give a prompt (special tokens written in the
    text become their ids), the run's BOS, EOS and PAD, its context length and, where the
    run's tokenizer folder has one, its chat template."""
    try:
        tokenizer_json = tokenizer.hf_json()
    except TokenizerError as e:
        raise hf.ConvertError(f"convert --with-tokenizer: {e}") from None
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{k}_token": tokenizer.piece(i) for k, i in _specials(tokenizer).items()},
        "model_max_length": cfg.data.seq_len,
        "clean_up_tokenization_spaces": False,
    }
    if template := find_template(template_dir(dataset.tokenizer_dir(cfg.data), workdir)):
        config["chat_template"] = template
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
    }


def _specials(tokenizer: Tokenizer) -> dict[str, int]:
    t = tokenizer
    return {"bos": int(t.bos_id), "eos": int(t.eos_id), "pad": int(t.pad_id)}


def _carried(dst: Path) -> list[Path]:
    """The files a user put beside an earlier export in `dst`, which the new one keeps; an
    earlier export's own files are replaced, not kept."""
    if not dst.exists():
        return []
    if not dst.is_dir():
        raise hf.ConvertError(f"convert: {dst} is a file; pass a directory to export into.")
    entries = list(dst.iterdir())
    if folders := sorted(p.name for p in entries if p.is_dir()):
        raise hf.ConvertError(
            f"convert: {dst} holds folders ({', '.join(folders[:3])}), so it is no earlier "
            "export; export into a new directory."
        )
    return [p for p in entries if not EXPORTED.fullmatch(p.name)]


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10}
    units |= {"MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    number = t.rstrip("KMGIB")
    unit = t[len(number) :]
    try:
        size = float(number) * units[unit]
    except (ValueError, KeyError):  # not a number (nan and inf are, below), or no unit
        size = math.nan
    if not 1 <= size < math.inf:
        raise hf.ConvertError(f"--max-shard-size {text!r}: use e.g. 5GB, 500MB or 2GiB.")
    return int(size)
