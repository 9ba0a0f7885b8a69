"""The shape of the code, kept: every module is placed in a layer of the import contracts
(pyproject.toml, checked by `lint-imports` in CI), no file grows past 500 lines, train.py
reads top to bottom, and the train step has no branch on any objective."""

import pkgutil
import tomllib
from pathlib import Path

import bigjax

ROOT = Path(__file__).resolve().parents[1]


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _layer_of(module: str, listed: set[str]) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in listed:
            return ".".join(parts[:n])
    return None


# packages whose modules sit in different layers (placed one by one)
PACKAGES = ("bigjax.data", "bigjax.serving")
SPLIT = tuple(f"{p}." for p in PACKAGES)


def test_every_module_is_placed_in_a_layer():
    core, tools = (set(c["source_modules"]) for c in _contracts()[:2])
    cli = {"bigjax.cli"}
    assert not core & tools
    modules = [
        m.name
        for m in pkgutil.walk_packages(bigjax.__path__, "bigjax.")
        if (m.name.count(".") == 1 or m.name.startswith(SPLIT)) and m.name not in PACKAGES
    ]
    unplaced = [m for m in modules if not _layer_of(m, core | tools | cli)]
    # A new module must be given a layer: core (imports no tool) or tool (imports no CLI).
    assert not unplaced, f"add these to a layer in pyproject.toml: {unplaced}"


def test_files_stay_small_and_train_reads_top_to_bottom():
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for p in (ROOT / "bigjax").rglob("*.py")
    }
    assert max(sizes.values()) <= 500, {k: v for k, v in sizes.items() if v > 500}
    train = (ROOT / "bigjax" / "train.py").read_text()
    assert len(train.splitlines()) <= 250 and "nonlocal" not in train


def test_the_train_step_has_no_branch_on_an_objective():
    import ast

    tree = ast.parse((ROOT / "bigjax" / "step.py").read_text())
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    used |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    features = {"images", "labels", "masking", "teacher", "adversary", "dp", "mlm", "privacy",
                "robust", "distill", "classify"}  # fmt: skip
    assert not features & used, features & used


def _any_in_public_signatures() -> dict[str, int]:
    """`Any` in the annotations of the core's public functions and methods, per module."""
    import ast
    import re

    core = _contracts()[0]["source_modules"]
    files = {p for m in core for p in [ROOT / f"{m.replace('.', '/')}.py"] if p.exists()}
    files |= {p for m in core if (ROOT / m.replace(".", "/")).is_dir()
              for p in (ROOT / m.replace(".", "/")).rglob("*.py")}  # fmt: skip

    def count(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
        a = fn.args
        notes = [x.annotation for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg)
                 if x is not None and x.annotation is not None] + [fn.returns]  # fmt: skip
        return sum(len(re.findall(r"\bAny\b", ast.unparse(n))) for n in notes if n is not None)

    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    out = {}
    for path in sorted(files):
        n = 0
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, functions) and not node.name.startswith("_"):
                n += count(node)
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                public = [f for f in node.body if isinstance(f, functions)]
                dunder = ("__init__", "__call__")
                n += sum(count(f) for f in public if not f.name.startswith("_") or f.name in dunder)
        out[str(path.relative_to(ROOT))] = n
    return out


def test_public_signatures_of_the_core_name_their_types():
    # A ratchet: 128 `Any` before the architecture's second step, at most half of it since
    # (parameter trees are `tree.Params`, tokenizers `Tokenizer`, data iterators `Batches`,
    # metric rows `metrics.Row`, ...). What is left is mostly JSON read from files.
    counts = _any_in_public_signatures()
    assert sum(counts.values()) <= 64, sorted(counts.items(), key=lambda kv: -kv[1])[:10]
