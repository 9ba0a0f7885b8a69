"""The docs are true: every command block of README.md and docs/*.md runs here (shrunk to a
few steps), unless it is marked `<!-- illustrative: why -->` (installs, peers' benchmarks,
GPUs, TPU pods, placeholder paths, hour-long jobs); links point at files in the repository."""

import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

from bigjax.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(
    r"(?:<!-- illustrative: (?P<why>[^>]*?) -->\n)?```(?:bash|sh)\n(?P<body>.*?)```", re.S
)
# Appended to each command (argparse and config overrides: the last value wins). Enough to run
# every code path a command takes, in seconds.
SHRINK = {
    "train": ["--config.num_steps=2", "--config.eval.num_batches=1",
              "--config.metrics.tensorboard=false"],
    "eval": ["--config.eval.num_batches=1", "--config.eval.choice_items=4"],
    "compress": ["--config.eval.num_batches=1"],
    "inspect": ["--ig-steps", "4", "--embed-tokens", "32"],
    "plan": ["--no-compile"],  # compiling an 8B step for a pod: tests/test_plan.py compiles
    "generate": ["--max-new-tokens", "8"],
}  # fmt: skip


def _blocks(path: Path) -> list[tuple[int, str | None, str]]:
    """(line, why it is illustrative or None, body) of each shell block."""
    text = path.read_text()
    return [
        (text[: m.start()].count("\n") + 1, m.group("why"), m.group("body"))
        for m in BLOCK.finditer(text)
    ]


def _commands(body: str) -> list[list[str]]:
    """The block's commands as argv lists: continuations joined, comments dropped."""
    return [
        words
        for line in body.replace("\\\n", " ").splitlines()
        if (words := shlex.split(line, comments=True))
    ]


def _argv(words: list[str]) -> list[str]:
    """`[XLA_FLAGS=...8] bigjax CMD ARGS` -> main()'s argv. The tests already run on 8 fake
    devices, the one environment setting the docs use."""
    if words[0].startswith("XLA_FLAGS="):
        assert words[0] == "XLA_FLAGS=--xla_force_host_platform_device_count=8", words
        words = words[1:]
    assert words[0] == "bigjax", f"not a bigjax command; mark the block illustrative: {words}"
    return words[1:]


def test_every_block_runs_here_or_says_why_not():
    for path in DOCS:
        for line, why, body in _blocks(path):
            where = f"{path.name}:{line}"
            if why is not None:
                assert len(why) > 10, f"{where}: say why it is illustrative"
                continue
            for words in _commands(body):
                _argv(words)  # raises on anything that is not a bigjax command


def test_docs_point_only_at_files_in_the_repository():
    for path in DOCS:
        text = path.read_text()
        assert "../shared" not in text and "DESIGN.md" not in text, path.name
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", text):
            if "://" in target:
                continue
            assert (path.parent / target).resolve().exists(), f"{path.name}: {target}"
            assert ROOT in (path.parent / target).resolve().parents, f"{path.name}: {target}"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """runs/tiny as the README's first command makes it (shrunk): later blocks use it."""
    sandbox = tmp_path_factory.mktemp("docs")
    _run_in(sandbox, ["train", "--config", "configs/lm_tiny.py", "--workdir", "runs/tiny"])
    return sandbox / "runs" / "tiny"


def _run_in(sandbox: Path, argv: list[str]) -> None:
    for name in ("configs", "experiments", "scripts"):
        if not (sandbox / name).exists():
            (sandbox / name).symlink_to(ROOT / name)
    cwd = Path.cwd()
    os.chdir(sandbox)
    try:
        assert main([*argv, *SHRINK.get(argv[0], [])]) == 0, argv
    finally:
        os.chdir(cwd)


RUNNABLE = [
    pytest.param(path, id=path.name)
    for path in DOCS
    if any(why is None for _, why, _ in _blocks(path))
]


@pytest.mark.slow
@pytest.mark.parametrize("path", RUNNABLE)
def test_the_commands_of_a_page_run(path, tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "runs" / "tiny")
    for _, why, body in _blocks(path):
        if why is None:
            for words in _commands(body):
                _run_in(tmp_path, _argv(words))
