"""The design's boundaries (what may import what), read from the source with `ast`, so a
forbidden import fails here even on a path no other test executes (a lazy import inside a
function counts as much as one at the top)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

SERVICE = REPO / "service"
FRAMEWORKS = ("ray", "mlflow", "hydra", "omegaconf")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file, relative imports resolved."""
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            # `from service.data import storage` imports the module service.data.storage.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def package_files(package: str) -> list[Path]:
    return sorted((SERVICE / package).rglob("*.py"))


@pytest.mark.parametrize("package", ["model", "parallel", "train"])
def test_model_parallel_and_train_know_nothing_of_ray_mlflow_or_hydra(package):
    offending = {f"{path.relative_to(REPO)}: {name}"
                 for path in package_files(package) for name in imported_modules(path)
                 if name.split(".")[0] in FRAMEWORKS}
    assert not offending, f"service/{package}/ must stay torch-only (DESIGN.md, Boundaries): {sorted(offending)}"


def test_model_code_knows_nothing_of_torch_distributed():
    offending = {f"{path.relative_to(REPO)}: {name}" for path in package_files("model")
                 for name in imported_modules(path) if name.startswith("torch.distributed")}
    assert not offending, f"exchanges are passed in to the model: {sorted(offending)}"


def test_the_data_package_imports_in_one_direction():
    """No import circle inside service/data/ (issue #15 item 3: decode.py <-> epochs.py was one)."""
    modules = {module_name(path): path for path in package_files("data")}
    graph = {name: {other for other in imported_modules(path) if other in modules and other != name}
             for name, path in modules.items()}
    assert graph["service.data.params"] >= {"service.data.epochs"}  # the scan sees real edges

    def cycle_from(start: str, path: list[str], done: set[str]) -> list[str] | None:
        for nxt in sorted(graph[start]):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done:
                found = cycle_from(nxt, path + [nxt], done)
                if found:
                    return found
        done.add(start)
        return None

    done: set[str] = set()
    for name in sorted(graph):
        cycle = cycle_from(name, [name], done)
        assert cycle is None, "import circle in service/data: " + " -> ".join(cycle)
