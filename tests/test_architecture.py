"""The architecture contract: dependencies point one way (pyproject.toml's import-linter contract), a cycle
fails with a message naming the import, the engine knows neither Streamlit nor the cache, modules stay small."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.argv = ['lint-imports', '--no-cache']; lint_imports_command()"]


def _lint(where: Path) -> subprocess.CompletedProcess:
    return subprocess.run(LINT, cwd=where, capture_output=True, text=True, timeout=300)


def test_the_import_contract_holds():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract_and_names_it(tmp_path):
    for part in ("engine", "cache", "service", "app_pages"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    # a bottom module reaching up to an analysis: the cycle a lazy import would otherwise hide
    (tmp_path / "engine" / "core" / "shortcut.py").write_text("from engine.analysis import sensitivity\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "engine.core.shortcut -> engine.analysis.sensitivity" in result.stdout


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_engine_knows_neither_streamlit_nor_the_cache():
    for path in (ROOT / "engine").rglob("*.py"):
        if path.parent.name == "cli":
            continue  # the CLI sits above the cache: its sweeps share the pages' memoized rows
        assert not _imports(path) & {"streamlit", "cache", "service", "app_pages"}, path


def test_engine_modules_stay_small():
    sizes = {path.relative_to(ROOT): len(path.read_text().splitlines()) for path in (ROOT / "engine").rglob("*.py")}
    assert all(lines <= 400 for lines in sizes.values()), {p: n for p, n in sizes.items() if n > 400}
