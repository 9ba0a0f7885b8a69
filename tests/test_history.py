"""Resume tells the truth: changed keys are shown and recorded, unusable ones stop the run."""

import json

import pytest
from conftest import tiny_config

from bigjax import history
from bigjax.checkpoint import CheckpointMismatch
from bigjax.config import to_dict
from bigjax.errors import BigjaxWarning
from bigjax.report import report
from bigjax.train import train


def test_changes_compare_dotted_keys_and_ignore_keys_one_side_lacks():
    old = to_dict(tiny_config())
    new = to_dict(tiny_config(optim={"lr": 1e-3}, mesh={"shape": (2, 2, 2)}))
    del old["robust"]  # a config written by an older bigjax: nothing to compare against
    changed = history.changes(old, new)
    assert changed == {
        "optim.lr": (0.003, 0.001),
        "mesh.shape": ([1, 1, -1, 1, 1, 1], [2, 1, 2, 1, 2, 1]),
    }
    assert history.unusable(changed, "runs/a") is None  # both can resume
    # the same mesh as a run from before the expert axis wrote it is no change
    old["mesh"]["shape"], old["mesh"]["dcn_shape"] = [1, 1, -1, 1, 1], [1, 1, 1, 1, 1]
    assert "mesh.shape" not in history.changes(old, to_dict(tiny_config()))
    assert "mesh.dcn_shape" not in history.changes(old, to_dict(tiny_config()))


def test_unusable_changes_name_each_key_and_the_way_out():
    old = to_dict(tiny_config())
    new = to_dict(tiny_config(optim={"name": "lion"}, model={"d_model": 64}))
    problem = history.unusable(history.changes(old, new), "runs/a")
    assert "optim.name='adamw' in the checkpoint, 'lion' in this run" in problem
    assert "model.d_model=128 in the checkpoint, 64 in this run" in problem
    assert "--config.checkpoint.init_from=runs/a" in problem and "new --workdir" in problem
    for key in ("model.dropout", "model.remat", "optim.schedule", "num_steps", "eval.every_steps"):
        assert key not in history.UNUSABLE  # how the same state trains on: allowed


def test_resume_shows_records_and_reports_what_trained_each_step_range(tmp_path, capsys):
    ckpt = {"every_steps": 1}
    train(tiny_config(num_steps=1, checkpoint=ckpt), tmp_path)
    train(tiny_config(num_steps=2, checkpoint=ckpt, optim={"lr": 1e-3}), tmp_path)
    out = capsys.readouterr().out
    assert "warning: optim.warmup_steps=2 is more than num_steps=1" in out  # said, not silent
    assert "config changed since step 1 (config_history.jsonl):" in out
    assert "  num_steps: 1 -> 2\n" in out and "  optim.lr: 0.003 -> 0.001\n" in out
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 1e-3
    first, second = history.read(tmp_path)
    assert first["from_step"] == 0 and first["config"]["optim"]["lr"] == 0.003
    assert second["from_step"] == 1 and second["changed"]["optim.lr"] == [0.003, 0.001]

    # Unusable: exit 2's error names the key and the way out; nothing is moved or written.
    with pytest.raises(CheckpointMismatch, match=r"model.d_model=128 in the checkpoint, 64"):
        train(tiny_config(num_steps=3, checkpoint=ckpt, model={"d_model": 64}), tmp_path)
    assert not (tmp_path / "checkpoints.corrupt").exists()
    assert len(history.read(tmp_path)) == 2

    # A resume from step 1 again (step 2 lost) drops the lost segment, records the new one.
    (tmp_path / "checkpoints" / "2").rename(tmp_path / "step2")
    train(tiny_config(num_steps=2, checkpoint=ckpt, optim={"lr": 2e-3}), tmp_path)
    assert [e["from_step"] for e in history.read(tmp_path)] == [0, 1]
    assert history.read(tmp_path)[1]["changed"]["optim.lr"] == [0.003, 0.002]
    text, _ = report([tmp_path], tmp_path / "report")
    assert "steps 0-1: as started" in text and "steps 1-2: num_steps 1 -> 2, optim.lr" in text


def test_a_damaged_history_is_skipped_with_a_warning_not_fatal(tmp_path):
    good = {"from_step": 0, "config": {}}
    lines = [json.dumps(good), "{cut short", json.dumps([1, 2]), json.dumps({"from_step": "x"})]
    (tmp_path / history.HISTORY).write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="3 line"):
        assert history.read(tmp_path) == [good]
    with pytest.warns(UserWarning):
        history.record(tmp_path, 5, {"a": 1}, {"a": 2})  # rewrites it whole and valid
    assert [e["from_step"] for e in history.read(tmp_path)] == [0, 5]
    assert history.segments(tmp_path, 9) == ["steps 0-5: as started", "steps 5-9: a 2 -> 1"]


def test_a_change_that_alters_what_later_steps_read_is_said_on_resume(tmp_path, capsys):
    config = to_dict(tiny_config())
    said = lambda changed, cfg=config: " ".join(history.caveats(changed, cfg))  # noqa: E731
    # new weights for the same sources go on where each was (test_data_resume)
    assert said({"data.mixture./d/a": (0.5, 0.9), "data.mixture./d/b": (0.5, 0.1)}) == ""
    # a source added or removed shows in the diff (a key a path: on one side only)
    two = to_dict(tiny_config(data={"mixture": (("/d/a", 0.5), ("/d/b", 0.5))}))
    three = to_dict(tiny_config(data={"mixture": (("/d/a", 0.4), ("/d/b", 0.4), ("/d/c", 0.2))}))
    assert history.changes(two, three) == {"data.mixture./d/a": (0.5, 0.4),
                                           "data.mixture./d/b": (0.5, 0.4),
                                           "data.mixture./d/c": (None, 0.2)}  # fmt: skip
    assert history.changes(three, two)["data.mixture./d/c"] == (0.2, None)
    assert "may now be evaluated" in said({"data.eval_fraction": (0.02, 0.1)})
    assert "another order" in said({"data.shuffle": (True, False)})
    # the order's seed: `seed` while data.seed is -1, else data.seed
    assert config["data"]["seed"] == -1 and config["seed"] == 0
    assert "seed changed (7 -> 0)" in said({"seed": (7, 0)})
    fixed = to_dict(tiny_config(data={"seed": 3}))
    assert said({"seed": (7, 0)}, fixed) == ""  # the data order keeps its seed
    assert said({"data.seed": (-1, 3)}, fixed) != ""  # seed 0 then, 3 now
    assert said({"data.seed": (0, -1)}) == ""  # 0 then, seed (0) now: the same order
    assert said({"optim.lr": (0.003, 0.001), "data.seq_len": (256, 64)}) == ""
    # said when a resume records the change, beside the diff
    saved = to_dict(tiny_config(data={"eval_fraction": 0.05}))
    with pytest.warns(BigjaxWarning, match="data.eval_fraction changed: where the run draws"):
        history.record(tmp_path, 4, config, saved)
    assert "  data.eval_fraction: 0.05 -> 0.02" in capsys.readouterr().out
