"""The core's wings import only downwards, in the order the README's layout table gives."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "training"
# Lowest first: a module may import its own wing and the wings before it, never one after it.
# errors.py (the package's own errors and cancel flag) sits under every wing.
WINGS = ("io", "data", "model", "infer", "train", "commands")


def _wing(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "training" or len(parts) < 2:
        return None
    if parts[1] == "errors":
        return -1
    return WINGS.index(parts[1]) if parts[1] in WINGS else None


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, including function-level ones."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # ``from training import data`` names a wing in the imported names.
            if name == "training":
                found += [(node.lineno, f"training.{a.name}") for a in node.names]
    return found


def upward_imports(core: Path = CORE) -> list[str]:
    bad = []
    for path in sorted(core.rglob("*.py")):
        rel = path.relative_to(core.parent).with_suffix("")
        own = _wing(".".join(rel.parts))
        if own is None:  # training/__init__.py, __main__.py: the package's entry points
            continue
        for line, name in _imports(path, core.parent):
            other = _wing(name)
            if other is not None and other > own:
                bad.append(f"{rel}.py:{line} imports {name} ({WINGS[own] if own >= 0 else 'errors'} "
                           f"is below {WINGS[other]})")
    return bad


def test_every_core_module_lives_in_a_wing():
    loose = [p.name for p in CORE.glob("*.py") if p.name not in ("__init__.py", "__main__.py", "errors.py")]
    assert loose == []
    assert sorted(p.name for p in CORE.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(WINGS)


def test_no_wing_imports_a_higher_one():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: a model-wing module importing the inference wing is reported,
    in each import form, at module and at function level."""
    fake = tmp_path / "training"
    for wing in WINGS:
        (fake / wing).mkdir(parents=True)
        (fake / wing / "__init__.py").write_text("")
    (fake / "errors.py").write_text("from training.io import volume\n")
    (fake / "model" / "a.py").write_text("from training.infer.pipeline import predict\n")
    (fake / "model" / "b.py").write_text("def f():\n    import training.train.trainer\n")
    (fake / "model" / "c.py").write_text("from ..commands import cli\n")
    (fake / "model" / "d.py").write_text("from training import infer\n")
    (fake / "model" / "ok.py").write_text("from training.io.volume import Volume\nfrom . import a\n")
    bad = upward_imports(fake)
    assert [b.split(":")[0] for b in bad] == [
        "training/errors.py", "training/model/a.py", "training/model/b.py", "training/model/c.py",
        "training/model/d.py",
    ]


def test_readme_layout_table_lists_the_wings_in_this_order():
    readme = (ROOT / "README.md").read_text()
    rows = [w for w in WINGS if f"`training/{w}/`" in readme]
    assert rows == list(WINGS)
    positions = [readme.index(f"`training/{w}/`") for w in WINGS]
    assert positions == sorted(positions)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
