"""The package's layout rules, checked on the source: every module opens with a docstring, no room
imports a room that builds on it, no generic top-level package is installed beside `orderplan`,
nothing edits sys.path, and the tests mirror the rooms."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "orderplan"

# room -> the rooms it may import (bottom to top); the package's top level (cli, __main__) may import any
ALLOWED = {
    "infra": set(),
    "config": {"infra"},
    "model": {"infra", "config"},
    "data": {"infra", "config", "model"},
    "oracle": {"infra", "config", "model"},
    "env": {"infra", "config", "model", "data", "oracle"},
    "planner": {"infra", "config", "model", "data", "oracle", "env"},
    "eval": {"infra", "config", "model", "data", "oracle", "env", "planner"},
    "train": {"infra", "config", "model", "data", "oracle", "env", "planner", "eval"},
}


def modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PKG.parent).with_suffix("").parts)


def imported(tree: ast.Module, name: str) -> set[str]:
    """Every module named by an import statement anywhere in the file (function-local ones too),
    relative imports resolved against the module `name`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".")[: -node.level]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


# package data, not code: the YAML presets (a package only so Hydra finds them) and the embedded weights
DATA_DIRS = {"configs", "artifacts"}


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "orderplan" else None


@pytest.mark.parametrize("path", modules(), ids=module_name)
def test_module_docstring_and_imports(path: Path):
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree)
    name = module_name(path)
    assert doc and len(doc.split()) >= 5, f"{name} must open with a docstring saying what it holds"
    room = room_of(name)
    if room is None:  # orderplan/__init__, cli, __main__: the top, may import any room
        return
    if room in DATA_DIRS:
        assert not imported(tree, name), f"{name} is package data and imports nothing"
        return
    assert room in ALLOWED, f"{name}: room {room!r} is not in the layout (add it to ALLOWED with its rules)"
    rooms = {room_of(n) for n in imported(tree, name) if n.startswith("orderplan.")} - {None, room}
    bad = sorted(rooms - ALLOWED[room])
    assert not bad, f"{name} ({room}) imports the rooms {bad}, which build on it"


def test_the_scan_sees_every_kind_of_import():
    """The scanner finds absolute, relative and function-local imports, and the rule catches an eval
    module that reaches into train (synthetic sources: no real module's imports are locked in)."""
    fake = ast.parse('"""An eval module that reaches into training."""\n'
                     "import orderplan.model.gpt\n"
                     "from ..train.bc import train_bc\n"
                     "def f():\n    from orderplan.env import core\n")
    names = imported(fake, "orderplan.eval.fake")
    assert {"orderplan.model.gpt", "orderplan.train.bc", "orderplan.env"} <= names
    rooms = {room_of(n) for n in names} - {None}
    assert rooms - ALLOWED["eval"] - {"eval"} == {"train"}


def test_only_orderplan_is_a_top_level_package():
    """No generic top-level names (`backbone`, `envs`, `agents`) beside the package: PyPI has
    packages of those names, and one would shadow the other."""
    assert sorted(p.name for p in (ROOT / "src").iterdir() if not p.name.endswith(".egg-info")) == ["orderplan"]
    for generic in ("backbone", "envs", "agents"):
        assert not (ROOT / generic).exists()


def test_nothing_edits_sys_path():
    """Scripts and tests import the installed package (tests' helpers come in through pytest's
    `pythonpath`): no `sys.path.insert` / `append` in scripts/, bench/, conftest or the package."""
    files = [*(ROOT / "scripts").glob("*.py"), *(ROOT / "bench").glob("*.py"), ROOT / "tests/conftest.py",
             *PKG.rglob("*.py")]
    offenders = [str(p.relative_to(ROOT)) for p in files if re.search(r"sys\.path\.(insert|append)", p.read_text())]
    assert not offenders, offenders


def test_tests_mirror_the_rooms():
    """tests/<room>/ exists for every room, and no test directory names a room that is gone."""
    test_dirs = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name not in ("support", "__pycache__")}
    assert set(ALLOWED) <= test_dirs, set(ALLOWED) - test_dirs
    assert test_dirs <= set(ALLOWED), test_dirs - set(ALLOWED)


def test_configs_and_artifacts_are_package_data():
    """The YAML presets and the embedded default live inside the package, and pyproject ships them."""
    assert (PKG / "configs" / "bc.yaml").exists() and (PKG / "artifacts/tiny_mnist/manifest.json").exists()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"configs/*.yaml"' in pyproject and "artifacts/tiny_mnist/*.safetensors" in pyproject


def test_slow_tests_are_marked_kept_out_and_run_by_ci():
    """The default run excludes the slow set, some tests are marked slow, and CI runs both sets."""
    addopts = [line for line in (ROOT / "pyproject.toml").read_text().splitlines() if line.startswith("addopts")]
    assert addopts and "not slow" in addopts[0]
    marked = [p for p in (ROOT / "tests").rglob("test_*.py") if "@pytest.mark.slow" in p.read_text()]
    assert len(marked) >= 3, marked
    ci = (ROOT / ".ci/run").read_text()
    assert "pytest -q\n" in ci and "pytest -q -m slow" in ci
