"""Directories replaced whole (bigjax/dirswap.py): the staging a killed writer leaves behind is
removed by the next writer of the same target, and nothing else is."""

import os
import subprocess
import sys
from pathlib import Path

from bigjax.dirswap import staging_dir, swap_in

ROOT = Path(__file__).resolve().parents[1]


def _stage_in_a_process_that_exits(final: Path) -> Path:
    """A staging made by a real process that then dies without swapping (a killed export)."""
    code = "import sys; from pathlib import Path; from bigjax.dirswap import staging_dir; "
    code += "print(staging_dir(Path(sys.argv[1])))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code, str(final)], cwd=ROOT, check=True,
                         capture_output=True, text=True, env=env)  # fmt: skip
    return Path(out.stdout.strip())


def test_a_dead_writers_staging_is_removed_by_the_next_one_and_a_live_ones_is_kept(tmp_path):
    final = tmp_path / "export[1]"  # glob characters in the name: matched literally
    dead = _stage_in_a_process_that_exits(final)
    assert dead.is_dir() and dead.parent == tmp_path and dead.name.startswith(".export[1].partial-")
    (dead / "model.safetensors").write_bytes(b"half written")
    live = staging_dir(final)  # this process's: alive
    other_target = _stage_in_a_process_that_exits(tmp_path / "export")  # another target's
    assert not dead.exists()  # removed when `live` was made
    again = staging_dir(final)
    assert live.is_dir() and again.is_dir() and other_target.is_dir()
    (again / "config.json").write_text("{}")
    swap_in(again, final)
    assert (final / "config.json").read_text() == "{}" and not again.exists()
    # a user's directory that merely looks alike (no host and pid in its name) is never touched
    mine = tmp_path / ".export[1].partial-notes"
    mine.mkdir()
    staging_dir(final)
    assert mine.is_dir()
