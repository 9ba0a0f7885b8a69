"""Trained run directories for the tools: one opened for use on this machine (eval, generate,
compress, inspect, export), or one written from parameters alone (import, compress)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bigjax.config import (
    ConfigError,
    from_configdict,
    full_mesh_shape,
    parse_override,
    set_path,
)

if TYPE_CHECKING:  # imported where used: the tools' start stays light
    from bigjax.data.tokenizer import Tokenizer


@contextlib.contextmanager
def open_run(
    workdir: str, overrides: Sequence[str], command: str, tensor: int = 1, reads_data: bool = False
) -> Iterator[tuple]:
    """A trained run, ready to use on this machine: yields (program, params, checkpoint step)
    inside its mesh. The config is the one its newest intact checkpoint was saved with (checked
    with it by its checksums; config.json, for a checkpoint without one), plus overrides; the
    mesh is FSDP over this machine's devices (in groups of `tensor` for tensor parallelism),
    whatever mesh the run trained on. The tokenizer is the run's own copy (`RUN/tokenizer`);
    a command that `reads_data` checks that its data's is the same."""
    import dataclasses as dc

    from bigjax import loading

    config_path = Path(workdir) / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{command}: {workdir} has no config.json; pass a run directory.")
    step, raw, changed = loading.run_config(workdir)
    if changed:  # a resume that has not saved yet, or config.json edited or damaged
        shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
        print(f"note: {config_path} differs from the config checkpoint step {step} was saved "
              f"with ({shown}); using the checkpoint's (set keys with --config.KEY=VALUE).",
              file=sys.stderr, flush=True)  # fmt: skip
    for item in overrides:
        set_path(raw, *parse_override(item))
    try:
        cfg = from_configdict(raw)
    except ConfigError as e:  # a value a later bigjax refuses, or a bad override
        raise ConfigError(
            f"{command}: the config of {workdir} (step {step}, with the overrides given) is "
            f"refused: {e} Override the key: --config.KEY=VALUE."
        ) from None
    one_slice = dc.replace(
        cfg.mesh, shape=full_mesh_shape((1, -1, tensor)), dcn_shape=full_mesh_shape((1, 1, 1))
    )
    cfg = dc.replace(cfg, mesh=one_slice)
    import jax

    from bigjax import lora
    from bigjax.data import dataset
    from bigjax.data.tokenizer import in_run, other_ids, same_ids
    from bigjax.mesh import for_run
    from bigjax.program import make_program, shapes
    from bigjax.resources import Resources

    cfg, mesh = for_run(cfg)
    with jax.set_mesh(mesh):
        # The tokenizer is all a trained model needs: a run's teacher, DP accounting and
        # choice items are for training it (a served distilled run must not need its teacher)
        # (the run's own copy: the dataset may have moved; a run without one reads the data's)
        kept = in_run(Path(workdir))
        if kept is None or reads_data:
            data_tokenizer = dataset.tokenizer_for(cfg.data)  # one line if the data is gone
            if kept is not None and not same_ids(kept, data_tokenizer):
                raise ConfigError(
                    f"{command}: {other_ids(Path(workdir), kept, data_tokenizer)} Its data "
                    "was prepared again with another tokenizer, or data.path names other data: "
                    "set --config.data.path to data prepared with the run's."
                )
        res = Resources(kept or data_tokenizer)
        prog = make_program(cfg, shapes(cfg, mesh), res)
        target = prog.target.params
        params, step = loading.load_params(workdir, target, prog.layer_order, step)
        # LoRA runs: the adapters folded into the weights, as the model ran in training
        yield prog, lora.merged(params, cfg.finetune.lora_scale), step


def write_params_run(
    dst: Path,
    config: dict[str, Any],
    params: Any,
    tokenizer: Tokenizer | None = None,
    chat_template: str | None = None,
    **meta: Any,
) -> None:
    """A run directory holding only parameters (an imported or compressed model): config.json,
    the model's tokenizer where it has one, and a parameters-only checkpoint at step 0, which
    generate, eval, convert and checkpoint.init_from open like any run."""
    import shutil

    from bigjax import errors, runlock
    from bigjax.checkpoint import param_layout
    from bigjax.data.tokenizer import save_in_run
    from bigjax.dirswap import staging_dir

    dst = Path(dst)
    check_new_run_dir(dst)
    dst.mkdir(parents=True, exist_ok=True)
    layout = param_layout(params)
    # One writer, as for a training run: a second import or compress into `dst` (or a run
    # training there) is refused, and the check is repeated now that no other can finish.
    lock = runlock.acquire(dst)
    try:
        check_new_run_dir(dst)
        # Written beside its place, then renamed in last: a kill at any point leaves no
        # `checkpoints` (the run can be written again) or a complete, sealed one with its config.
        staged = staging_dir(dst / "checkpoints")
        try:
            save_params(staged, params, {"config": config, "params": layout, **meta})
            write_text(dst / "config.json", json.dumps(config, indent=2) + "\n")
            if tokenizer is not None:  # replacing an earlier, killed writer's
                save_in_run(dst, tokenizer, chat_template)
            staged.rename(dst / "checkpoints")
        except BaseException as e:
            shutil.rmtree(staged, ignore_errors=True)
            errors.note_writing(e, dst)
            raise
    finally:
        lock.release()


def write_text(path: Path, text: str) -> None:
    """A whole file or none: written beside, then renamed over."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def check_outside(workdir: str | Path, out: str | Path, command: str) -> None:
    """Raises if `out`, a new run written from the run `workdir`, lies inside it (in its
    checkpoints, say). A `workdir` that is no run is left to the command's own error."""
    import os

    # realpath, not resolve(): no RuntimeError on a link loop (check_output names that)
    inside = Path(os.path.realpath(out)).is_relative_to(os.path.realpath(workdir))
    if inside and (Path(workdir) / "config.json").is_file():
        raise ConfigError(f"{command}: --out {out} is inside the run it {command}es; pick a "
                          "directory outside it.")  # fmt: skip


def check_new_run_dir(dst: Path) -> None:
    """Raises if `dst` cannot become a new run directory (callers check before their work)."""
    from bigjax.checkpoint import check_path

    check_path(dst)
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"{dst} is a file; pick a directory for the new run.")
    if (dst / "checkpoints").exists():
        raise ConfigError(f"{dst} already holds checkpoints; pick a new directory.")


def save_params(directory: Path, params: Any, meta: dict[str, Any]) -> None:
    """A parameters-only checkpoint at step 0 (an imported model): what `load_params` and
    `checkpoint.init_from` read. `meta` must hold the parameter layout under "params"."""
    import orbax.checkpoint as ocp

    from bigjax.checkpoint import check_path

    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(check_path(Path(directory).absolute()), options=options)
    try:
        manager.save(
            0,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params}),
                meta=ocp.args.JsonSave({**meta, "params_only": True}),
            ),
        )
        manager.wait_until_finished()
    finally:
        manager.close()
    from bigjax import integrity

    integrity.seal(Path(directory) / "0")  # committed by the synchronous save: loaders verify
