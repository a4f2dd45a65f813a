"""Dependencies are declared and locked: every third-party module that service/, tests/ and bench/
import is declared in pyproject.toml; constraints.txt (from `make lock`) pins every declared
dependency within its bounds; this environment holds exactly the locked versions (what `make`
installs is what the tests ran against); and every install of the project goes through the lock."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import REPO, declared_requirements

SCANNED = ("service", "tests", "bench")
# Installed first and pinned per build (CPU, cu126, cu130) by the Makefile and the Dockerfiles.
NOT_LOCKED = {"torch", "torchvision"}
# Locked distributions `make install` (extra `test`) does not install: the `gpu` extra's NVML
# binding and nvJPEG runtime, and what only the `tracking-server` extra's mlflow[auth] pulls in.
LOCKED_NOT_INSTALLED = ("nvidia-ml-py", "nvidia-nvjpeg-cu12", "flask-wtf", "wtforms")
# Import names of declared distributions that may not be installed here (the `gpu` extra).
NOT_INSTALLED_HERE = {"pynvml": "nvidia-ml-py"}


def _locked() -> dict[str, tuple[str, str]]:
    """constraints.txt as {name: (version, marker)} for the lines that apply to this interpreter."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if not line or line.startswith((" ", "#")):
            continue
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate():
            pins[canonicalize_name(requirement.name)] = (str(requirement.specifier)[2:], line)
    return pins


def _imports() -> dict[str, set[str]]:
    """Top-level module -> files, for every `import`, `from ... import` and pytest.importorskip()."""
    found: dict[str, set[str]] = {}
    for root in SCANNED:
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "importorskip"
                      and node.args and isinstance(node.args[0], ast.Constant)):
                    names = [node.args[0].value]
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def _local_modules() -> set[str]:
    """Modules of this repository: the scanned packages, the tests' helpers, bench scripts."""
    local = set(SCANNED)
    for root in SCANNED:
        local |= {path.stem for path in (REPO / root).rglob("*.py")}
        local |= {path.name for path in (REPO / root).rglob("*") if path.is_dir()}
    return local


def test_every_import_is_a_declared_dependency():
    declared = {canonicalize_name(r.name) for r in declared_requirements()}
    distributions = metadata.packages_distributions()
    local = _local_modules()
    undeclared = {}
    for module, files in sorted(_imports().items()):
        if module in sys.stdlib_module_names or module == "__future__" or module in local:
            continue
        names = distributions.get(module) or [NOT_INSTALLED_HERE.get(module, module)]
        if not any(canonicalize_name(name) in declared for name in names):
            undeclared[module] = (names, sorted(files)[:3])
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_the_lock_pins_every_declared_dependency_within_its_bounds():
    pins = _locked()
    assert not NOT_LOCKED & set(pins), f"{NOT_LOCKED} are pinned per build, not in constraints.txt"
    problems = []
    for requirement in declared_requirements():
        name = canonicalize_name(requirement.name)
        if name in NOT_LOCKED or (requirement.marker and not requirement.marker.evaluate()):
            continue
        if name not in pins:
            problems.append(f"{requirement} is not in constraints.txt")
        elif not requirement.specifier.contains(pins[name][0], prereleases=True):
            problems.append(f"constraints.txt has {pins[name][1]!r}, outside {requirement}")
    assert not problems, "run `make lock`: " + "; ".join(problems)


def test_this_environment_is_the_locked_one():
    """What the suite runs against is what constraints.txt says (no drift after `make lock`)."""
    drift, missing = {}, []
    for name, (version, _) in _locked().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        if installed != version:
            drift[name] = (installed, version)
    assert not drift, f"installed != locked (run `make install`): {drift}"
    assert sorted(missing) == sorted(LOCKED_NOT_INSTALLED), \
        f"locked but not installed (run `make install`): {sorted(set(missing) - set(LOCKED_NOT_INSTALLED))}"


def test_torch_versions_are_the_tested_ones():
    """torch's bounds name the tested releases (2.13 here, 2.11 on the GPU machine), and torchvision's
    match them release for release (0.26 = 2.11 ... 0.28 = 2.13)."""
    bounds = {canonicalize_name(r.name): r.specifier for r in declared_requirements()}
    assert bounds["torch"].contains("2.13.0") and bounds["torch"].contains("2.11.0")
    assert not bounds["torch"].contains("2.14.0"), "an untested torch release line is allowed"
    assert bounds["torch"].contains(metadata.version("torch").split("+")[0])
    assert bounds["torchvision"].contains("0.26.0") and bounds["torchvision"].contains("0.28.0")
    assert not bounds["torchvision"].contains("0.29.0")


@pytest.mark.parametrize("path", ["Makefile", "docker/Dockerfile", "docker/Dockerfile.cpu"])
def test_every_project_install_uses_the_lock(path):
    text = (REPO / path).read_text().replace("\\\n", " ")
    installs = [line for line in text.splitlines()
                if re.search(r"pip install\b.*(\s|\")\.(\[[\w,-]+\])?\"?(\s|$)", line)]
    assert installs, f"{path} never installs the project"
    for line in installs:
        assert "-c constraints.txt" in line, f"{path}: {line.strip()} bypasses constraints.txt"


def test_ci_installs_through_make_and_brings_postgres():
    script = (REPO / ".ci" / "run").read_text()
    targets = re.search(r"^for target in ([\w -]+); do$", script, re.M)
    assert targets and targets.group(1).split() == ["test", "test-slow"], \
        ".ci/run must run the README's `make test`, then the slow tests"
    assert 'make "$target"' in script and re.search(r"^export CI=true$", script, re.M)
    assert "apt-get install" in script and "postgresql" in script
    assert "RAY_USAGE_STATS_ENABLED=0" in script and "MLFLOW_DISABLE_TELEMETRY=true" in script
