"""The architecture contract: dependencies point one way (pyproject.toml's import-linter contract), a cycle
fails with a message naming the import, the engine knows neither Streamlit nor the cache, modules stay small,
and every module with logic is named by a test."""
from __future__ import annotations

import ast
import re
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


# ---- every module with logic is named by a test ---------------------------------------------------
PACKAGES = ("engine", "cache", "service", "app_pages")
ERROR_BASES = ("Error", "Exception", "Warning")
IMPORT_LINE = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import\s+([\w, ]+)|import\s+([\w., ]+))", re.M)


def _has_logic(tree: ast.Module) -> bool:
    """A module defines a function or a class that is not an exception, or runs statements when it is run (a
    page script): a module of exceptions and constants has nothing a test could run."""
    if any(isinstance(node, (ast.If, ast.For, ast.While, ast.With, ast.Try)) or
           isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) for node in tree.body):
        return True
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return True
        if isinstance(node, ast.ClassDef) and not any(
                (base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")).endswith(ERROR_BASES)
                for base in node.bases):
            return True
    return False


def _modules(root: Path) -> dict[str, Path]:
    """Dotted name -> path (relative to `root`) of every module with logic in the packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" not in path.parts and _has_logic(ast.parse(path.read_text())):
                parts = path.relative_to(root).with_suffix("").parts
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path.relative_to(root)
    return found


def _named_in(tree: ast.Module) -> tuple[set[str], set[str], bool]:
    """(modules the code imports, its string constants, whether it runs the CLI: `python -m engine` or
    engine.cli's main). Imports inside strings count: a test that runs a script in a fresh process names the
    modules that script imports."""
    imported, strings = set(), set()
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}  # prose runs nothing
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            strings.add(node.value)
            for module, names, plain in IMPORT_LINE.findall(node.value):
                if module:
                    imported |= {module} | {f"{module}.{name.strip()}" for name in names.split(",")}
                else:
                    imported |= {name.strip() for name in plain.split(",")}
        elif isinstance(node, (ast.List, ast.Tuple)):
            values = [item.value if isinstance(item, ast.Constant) else None for item in node.elts]
            if any(values[i:i + 2] == ["-m", "engine"] for i in range(len(values) - 1)):
                imported.add("engine.__main__")  # what `python -m engine` runs
    return imported, strings, bool(imported & {"engine.__main__", "engine.cli.main"})


def _cli_modules(root: Path, commands: set[str], modules: dict[str, Path]) -> set[str]:
    """engine.cli, the modules of the commands the tests run, and the engine.cli modules those import."""
    tree = ast.parse((root / "engine" / "cli" / "__init__.py").read_text())
    table = next(node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "COMMANDS" for t in node.targets))
    run = {"engine.cli"} | {ast.literal_eval(value)[0] for key, value in zip(table.keys, table.values)
                            if ast.literal_eval(key) in commands}
    reached, todo = set(), list(run)
    while todo:
        module = todo.pop()
        if module in reached or module not in modules:
            continue
        reached.add(module)
        imported, _, _ = _named_in(ast.parse((root / modules[module]).read_text()))
        todo += [name for name in imported if name.startswith("engine.cli.")]
    return reached


def untested(root: Path, tests: Path) -> list[str]:
    """The modules with logic under `root` that no test file under `tests` names: by importing it (`import a.b.c`,
    `from a.b import c`, `from a.b.c import x`, in its code or in a script it runs); a page by its path
    ("app_pages/<page>.py", "<page>.py", or its name in a test that opens pages from app_pages/); a CLI module by
    running the CLI with one of its commands, or by being imported by such a command's module."""
    modules = _modules(root)
    imported, strings, commands, page_names = set(), set(), set(), set()
    for path in tests.rglob("*.py"):
        names, constants, runs_cli = _named_in(ast.parse(path.read_text()))
        imported |= names
        strings |= constants
        if runs_cli:
            commands |= constants
        if "app_pages" in constants:
            page_names |= constants
    named = imported | _cli_modules(root, commands, modules)
    pages = {module for module, path in modules.items() if path.parts[0] == "app_pages" and (
        f"{path.stem}.py" in strings or path.stem in page_names or any(s.endswith(path.as_posix()) for s in strings))}
    return sorted(path.as_posix() for module, path in modules.items() if module not in named | pages)


def test_every_module_with_logic_is_named_by_a_test():
    missing = untested(ROOT, ROOT / "tests")
    assert not missing, f"modules with logic that no test names (write a test that imports or runs them): {missing}"


def test_an_untested_module_is_named_and_exceptions_alone_need_no_test(tmp_path):
    for part in PACKAGES:
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    tests = tmp_path / "tests"
    # the suite without this file, whose own strings name the modules made here
    shutil.copytree(ROOT / "tests", tests, ignore=shutil.ignore_patterns("__pycache__", Path(__file__).name))
    (tmp_path / "engine" / "core" / "untested.py").write_text("def double(x):\n    return 2 * x\n")
    (tmp_path / "engine" / "core" / "failures.py").write_text("class OddError(ValueError):\n    pass\n")
    (tmp_path / "app_pages" / "new_page.py").write_text("import streamlit as st\n\nst.write(1)\n")  # a page script
    assert untested(tmp_path, tests) == ["app_pages/new_page.py", "engine/core/untested.py"]
    # named only by the script a test runs in a fresh process, and a page by its path
    (tests / "test_new.py").write_text('SCRIPT = """\nfrom engine.core.untested import double\n"""\n'
                                       'PAGE = "app_pages/new_page.py"\n')
    assert untested(tmp_path, tests) == []
