"""The shape of the code, kept: every module is placed in a layer of the import contracts
(pyproject.toml, checked by `lint-imports` in CI), no file grows past 500 lines, train.py
reads top to bottom, and the train step has no branch on any objective."""

import ast
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


def _text_io_without_encoding(path: Path) -> list[int]:
    """Lines of `path` that read or write a text file in the locale's encoding: Path.read_text,
    Path.write_text(data), open(...) or Path.open(MODE) in a text mode, with no encoding."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
        modes = [k.value for k in node.keywords if k.arg == "mode" and name == "open"]
        if isinstance(fn, ast.Name) and name == "open":
            modes += node.args[1:2] or [ast.Constant("r")]
        elif isinstance(fn, ast.Attribute) and name == "open":  # Path.open("w"), not X.open(p)
            modes += [a for a in node.args[:1] if isinstance(a, ast.Constant)]
        text_mode = any(isinstance(m, ast.Constant) and "b" not in str(m.value) for m in modes)
        # one positional argument: Path.write_text(data), not bigjax.trained.write_text(p, d)
        if name == "read_text" or (name == "write_text" and len(node.args) == 1) or text_mode:
            lines.append(node.lineno)
    return lines


def test_every_text_file_is_read_and_written_as_utf8():
    # in a Latin-1 locale, tokenizer.json could not be saved and Hugging Face files were
    # misread (tests/test_locale.py): the encoding is said at every call, not left to the locale
    found = {
        str(p.relative_to(ROOT)): lines
        for p in sorted((ROOT / "bigjax").rglob("*.py"))
        if (lines := _text_io_without_encoding(p))
    }
    assert not found, f"say encoding='utf-8' (or open in binary) at {found}"
