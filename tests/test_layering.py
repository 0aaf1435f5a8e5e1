"""The code's shape as rules the suite enforces: import layering, function length, public names only."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Longest function allowed, in lines (def to last line), per tree.
MAX_LINES = {"service": 100, "fakes": 100, "bench": 150, "harness": 150}


def _lint_imports() -> str:
    beside = Path(sys.executable).parent / "lint-imports"
    found = str(beside) if beside.exists() else shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports not installed: it comes with the dev extra (make install)")
    return found


def test_import_contracts_hold() -> None:
    """The contracts in pyproject.toml ([tool.importlinter]): which package may import which."""
    result = subprocess.run(
        [_lint_imports(), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def _python_files(tree: str) -> list[Path]:
    return sorted((ROOT / tree).rglob("*.py"))


@pytest.mark.parametrize("tree", sorted(MAX_LINES))
def test_no_function_is_too_long(tree: str) -> None:
    too_long = []
    for path in _python_files(tree):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_LINES[tree]:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, f"over {MAX_LINES[tree]} lines: {too_long}"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_service_names(source: str, filename: str = "<source>") -> list[str]:
    """Private names of `service` a module uses: `from service.x import _y`, and `m._y` where `m`
    is bound by an import from `service` (a module, class or function of it)."""
    tree = ast.parse(source, filename)
    bound: set[str] = set()
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "service":
            for alias in node.names:
                if _private(alias.name) or any(_private(part) for part in node.module.split(".")):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                bound.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "service":
                    if any(_private(part) for part in alias.name.split(".")):
                        found.append(f"line {node.lineno}: import {alias.name}")
                    bound.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_private_name_check_finds_both_forms() -> None:
    source = (
        "from service.api.appointments import _load\n"
        "from service.dispatch import dispatcher\n"
        "import service.dispatch.store as store\n"
        "dispatcher._RECORD_RETRIES = 1\n"
        "store.ReminderStore._fence_is\n"
        "from service.db import Database\n"
        "Database(url).engine\n"
    )
    assert len(private_service_names(source)) == 3


@pytest.mark.parametrize("tree", ["bench", "harness", "fakes"])
def test_bench_harness_and_fakes_use_only_public_service_names(tree: str) -> None:
    used = {
        str(path.relative_to(ROOT)): names
        for path in _python_files(tree)
        if (names := private_service_names(path.read_text(), str(path)))
    }
    assert not used
