"""The package's layout: no import circle, no oversized module, benchmarks kept out of the core; what a bare clone needs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "snapvit_lightning"
MAX_LINES = 700
#: The command-line entry point may reach the benchmarks: ``snapvit bench`` is one of its subcommands.
MAY_IMPORT_BENCHMARKS = {"snapvit_lightning.cli"}


def _modules() -> dict[str, Path]:
    """``{dotted name: path}`` of every module of the package (``__init__`` as the package itself)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from . import x`` / ``from .pkg import mod`` may name submodules
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_no_import_circle():
    # A module's own package (``from . import __version__``) is imported before it anyway: no edge.
    graph = {name: {t for t in targets if not _inside(name, t)} for name, targets in _graph().items()}
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_the_circle_check_sees_lazy_imports(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from .b import g\n")
    modules = {"pkg.a": a, "pkg.b": tmp_path / "b.py"}
    assert _imports("pkg.a", a, modules) == {"pkg.b"}
    assert _cycle({"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}) == ["pkg.a", "pkg.b", "pkg.a"]


def test_no_oversized_module():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_no_benchmark_scripts_at_the_package_root():
    assert sorted(p.name for p in PACKAGE.glob("bench*.py")) == []


def test_the_core_never_imports_the_benchmarks():
    offenders = {
        name: sorted(t for t in targets if _inside(t, "snapvit_lightning.benchmarks"))
        for name, targets in _graph().items()
        if not _inside(name, "snapvit_lightning.benchmarks") and name not in MAY_IMPORT_BENCHMARKS
    }
    assert {name: targets for name, targets in offenders.items() if targets} == {}


@pytest.mark.parametrize("required", [False, True])
def test_quality_tests_skip_without_shared_unless_it_is_required(tmp_path, required):
    """A clone with no ../shared skips the photos8 tests with the reason; SNAPVIT_SHARED (.ci/run) makes them fail."""
    import re

    from conftest import require_photos

    missing = tmp_path / "shared" / "data" / "photos8"
    outcome = pytest.fail.Exception if required else pytest.skip.Exception
    with pytest.raises(outcome, match=re.escape(f"held-out quality test: needs the photos8 folder {missing} (")):
        require_photos(missing, required)
    missing.mkdir(parents=True)
    assert require_photos(missing, required) == missing
