"""A run keeps its tokenizer (`RUN/tokenizer`): the tools read text with it when the dataset
has moved, a resume on data with another tokenizer is refused, a new run from another run's
weights on data of another tokenizer is warned about, and imports and compressions keep the
model's tokenizer too."""

import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
from conftest import tiny_config

from bigjax.cli import main
from bigjax.data.prepare import PrepareConfig, prepare
from bigjax.data.tokenizer import TokenizerError
from bigjax.errors import BigjaxWarning
from bigjax.serving import chat
from bigjax.train import train

STDLIB = Path(sys.modules["json"].__file__).parents[1]
MODULES = ("heapq", "colorsys", "keyword", "base64", "calendar", "copy", "csv", "difflib")


def _prepare(out: Path, vocab: int) -> Path:
    files = tuple(str(STDLIB / f"{n}.py") for n in MODULES)
    prepare(PrepareConfig(inputs=files, output=str(out), workers=1, tokenizer=f"bpe:{vocab}",
                          val_fraction=0.3))  # fmt: skip
    return out


def _config(data: Path, steps: int, **groups):
    return tiny_config(num_steps=steps, data={"path": str(data), "batch_size": 8, "seq_len": 64},
                       model={"size": "tiny", "vocab_size": 512}, **groups)  # fmt: skip


def _generate(capsys, run: Path) -> str:
    capsys.readouterr()
    argv = ["generate", str(run), "--prompt", "def f(", "--max-new-tokens", "6"]
    assert main([*argv, "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    return "".join(line for line in out.splitlines(True) if "tokens/s" not in line)  # timings


@pytest.mark.slow
def test_a_run_keeps_its_tokenizer_for_the_tools_and_refuses_data_with_another(tmp_path, capsys):
    ds = _prepare(tmp_path / "ds", 300)
    run = tmp_path / "run"
    train(_config(ds, 2), run)
    kept = (run / "tokenizer" / "tokenizer.json").read_text()
    assert kept == (ds / "tokenizer" / "tokenizer.json").read_text()
    text = _generate(capsys, run)

    # The dataset moved away: the tools that read no data still work, with the same text.
    ds.rename(tmp_path / "moved")
    assert _generate(capsys, run) == text
    assert main(["convert", str(run), str(tmp_path / "hf"), "--with-tokenizer"]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == kept
    assert main(["eval", str(run)]) == 2  # it reads the held-out split: one line naming it
    assert "is not a prepared dataset" in capsys.readouterr().err

    # The dataset prepared again at its path with another tokenizer: before, the resume
    # trained on, its ids meaning other text. Refused before anything is restored.
    _prepare(ds, 400)
    with pytest.raises(
        TokenizerError, match=r"trained with a hf tokenizer of 300 ids .* data has a"
    ):
        train(_config(ds, 4), run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    # so is an eval on it (its loss would score other text); generate reads no data
    capsys.readouterr()
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "bigjax: error: eval: " in err and "trained with a hf tokenizer of 300 ids" in err
    assert _generate(capsys, run) == text

    # A new run from the run's weights on that data: warned, naming the way to the right data.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(_config(ds, 1, checkpoint={"init_from": str(run)}), tmp_path / "tuned")
    said = [str(w.message) for w in caught if issubclass(w.category, BigjaxWarning)]
    assert any(f"--tokenizer hf:{run / 'tokenizer' / 'tokenizer.json'}" in s for s in said), said


@pytest.mark.slow
def test_an_export_imported_again_keeps_its_tokenizer_and_generates_the_same(tmp_path, capsys):
    # bigjax -> Hugging Face (with the byte tokenizer as a tokenizer.json) -> bigjax: the
    # imported run reads text with that tokenizer, so it generates what the original did.
    run = tmp_path / "run"
    train(tiny_config(num_steps=2, data={"batch_size": 8, "seq_len": 64}), run)
    text = _generate(capsys, run)
    assert main(["convert", str(run), str(tmp_path / "hf"), "--with-tokenizer"]) == 0
    # a chat template, as an instruct model's tokenizer_config.json carries one
    hf_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    hf_config["chat_template"] = template
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(hf_config))
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "tokenizer" / "tokenizer.json").is_file()
    assert _generate(capsys, tmp_path / "back") == text
    # the template stays with the imported run: serve renders it, an export carries it on
    assert chat.template_dir(None, tmp_path / "back") == tmp_path / "back" / "tokenizer"
    assert main(["convert", str(tmp_path / "back"), str(tmp_path / "hf2"), "--with-tokenizer"]) == 0
    assert json.loads((tmp_path / "hf2" / "tokenizer_config.json").read_text())[
        "chat_template"] == template  # fmt: skip
    # a compressed run keeps it too
    out = str(tmp_path / "pruned")
    assert (
        main(["compress", "prune", str(tmp_path / "back"), "--sparsity", "0.1", "--out", out]) == 0
    )
    assert (tmp_path / "pruned" / "tokenizer" / "tokenizer.json").is_file()

    # A tokenizer.json bigjax cannot use (no end-of-text token here) is left, with a note.
    shutil.copytree(tmp_path / "hf", tmp_path / "odd")
    (tmp_path / "odd" / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "odd"), str(tmp_path / "odd_run")]) == 0
    assert "tokenizer.json is not kept with the run" in capsys.readouterr().err
    assert not (tmp_path / "odd_run" / "tokenizer").exists()


def test_a_run_with_no_checkpoint_left_replaces_its_kept_tokenizer(tmp_path):
    """Refused only where there is a checkpoint to resume: a user who deleted checkpoints/ to
    start the run afresh on other data gets the new tokenizer kept (it was refused before)."""
    from bigjax import checkpoint
    from bigjax.data.tokenizer import ByteTokenizer, in_run, keep_in_run, same_ids, train_bpe

    bpe = train_bpe([f"def f{i}(x): return x * {i}\n" for i in range(50)], 300)
    keep_in_run(tmp_path, ByteTokenizer(), write=True, init_from="", resuming=False)
    with pytest.raises(TokenizerError, match=r"trained with a byte tokenizer of \d+ ids"):
        keep_in_run(tmp_path, bpe, write=True, init_from="", resuming=True)
    assert same_ids(in_run(tmp_path), ByteTokenizer())
    with pytest.warns(BigjaxWarning, match=r"tokenizer: replaced by this run's hf tokenizer"):
        keep_in_run(tmp_path, bpe, write=True, init_from="", resuming=False)
    assert same_ids(in_run(tmp_path), bpe)

    # What train asks: a step, or steps set aside as corrupt, are a run to resume.
    saves = tmp_path / "checkpoints"
    assert not checkpoint.has_steps(saves)
    saves.mkdir()
    (saves / "4.orbax-checkpoint-tmp-1").mkdir()  # an unfinished save is no step
    assert not checkpoint.has_steps(saves)
    (tmp_path / "checkpoints.corrupt" / "4-20261207").mkdir(parents=True)
    assert checkpoint.has_steps(saves)
    shutil.rmtree(tmp_path / "checkpoints.corrupt")
    (saves / "6").mkdir()
    assert checkpoint.has_steps(saves)


@pytest.mark.slow
def test_a_run_started_afresh_on_data_of_another_tokenizer_keeps_the_new_one(tmp_path):
    ds, run = _prepare(tmp_path / "ds", 300), tmp_path / "run"
    train(_config(ds, 2), run)
    shutil.rmtree(run / "checkpoints")  # the user starts the run afresh, on other data
    _prepare(ds, 400)
    with pytest.warns(BigjaxWarning, match="no checkpoint is left to resume"):
        train(_config(ds, 2), run)
    kept = (run / "tokenizer" / "tokenizer.json").read_text()
    assert kept == (ds / "tokenizer" / "tokenizer.json").read_text()


def test_a_teacher_that_kept_another_tokenizer_is_refused(tmp_path):
    """Distillation matches distributions id by id: a teacher trained on another tokenizer's
    ids (with the same vocab_size, so its size check passes) taught other text, silently."""
    from bigjax.data.tokenizer import ByteTokenizer, keep_in_run, train_bpe

    teacher, student = tmp_path / "teacher", tmp_path / "student"
    teacher.mkdir()
    keep_in_run(teacher, ByteTokenizer(), write=True, init_from="", resuming=False)
    bpe = train_bpe([f"def f{i}(x): return x * {i}\n" for i in range(50)], 300)
    with pytest.raises(TokenizerError, match=r"distill.teacher: .*teacher was trained with a "
                                             r"byte tokenizer"):  # fmt: skip
        keep_in_run(student, bpe, write=True, init_from="", resuming=True, teacher=str(teacher))
    assert not (student / "tokenizer").exists()  # refused before anything is written
    keep_in_run(student, ByteTokenizer(), write=True, init_from="", resuming=False,
                teacher=str(teacher))  # fmt: skip
    assert (student / "tokenizer").is_dir()
