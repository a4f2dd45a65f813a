"""docker/Dockerfile (CUDA) and docker/Dockerfile.cpu, checked without a Docker engine:
they parse, the base images are pinned, the CUDA image's torch build exists and matches its
base image's CUDA, the final user is not root, no ENV/ARG carries a secret, every Python
package they pip-install is declared in pyproject.toml, and the project installs from the lock."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import REPO, declared_requirements, pyproject

# name -> (file, base image pattern whose group 1 is the platform, torch index of that platform).
DOCKERFILES = {
    "cuda": (REPO / "docker" / "Dockerfile", r"rayproject/ray:2\.60\.0-py311-(cu\d+)",
             "https://download.pytorch.org/whl/{}"),
    "cpu": (REPO / "docker" / "Dockerfile.cpu", r"rayproject/ray:2\.60\.0-py311-(cpu)",
            "https://download.pytorch.org/whl/{}"),
}
# CUDA variants torch 2.13 publishes wheels for (13.2 is experimental; there is no cu128), and the
# CUDA tags of the Ray 2.60 images (ray-project/ray ray-images.json; `-gpu` aliases cu121).
TORCH_2_13_CUDA = {"cu126", "cu130"}
RAY_2_60_CUDA = {"cu117", "cu118", "cu121", "cu123", "cu124", "cu125", "cu126", "cu128", "cu129", "cu130"}
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL|PRIVATE",
                         re.IGNORECASE)
SECRET_VALUE = re.compile(r"AKIA[0-9A-Z]{16}|://[^/\s:@]+:[^@\s/]+@")
# pip options that take a value (the value is not a requirement).
PIP_VALUE_OPTIONS = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-c",
                     "--constraint", "-r", "--requirement", "--target", "-t", "--prefix",
                     "--root", "--platform", "--python-version", "--implementation", "--abi",
                     "--only-binary", "--no-binary", "--progress-bar", "--trusted-host",
                     "--cache-dir", "--src", "--upgrade-strategy", "--config-settings", "-C"}


@dataclass
class Instruction:
    """One Dockerfile instruction: keyword, raw argument text and its first line number."""

    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """A small Dockerfile parser: parser directives, comments, `\\` continuations,
    upper-case keywords; raises ValueError on anything it does not understand."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue  # blank line, comment or parser directive
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker too
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        if keyword not in INSTRUCTIONS:
            raise ValueError(f"line {start}: unknown instruction {keyword!r}")
        if not args.strip():
            raise ValueError(f"line {start}: {keyword} without arguments")
        instructions.append(Instruction(keyword, args.strip(), start))
    if pending:
        raise ValueError("the file ends inside a continued line")
    if not instructions or instructions[0].keyword not in ("FROM", "ARG"):
        raise ValueError("a Dockerfile must start with FROM (or ARG before FROM)")
    return instructions


def key_values(args: str) -> dict[str, str]:
    """`ENV`/`ARG` arguments (`K=V K2="v 2"`, legacy `K V`, or a bare `ARG K`) as a dict."""
    words = shlex.split(args)
    if "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) if "=" in word else (word, "") for word in words)


def expand(text: str, variables: dict[str, str]) -> str:
    """Substitute `$VAR` / `${VAR}` the way the build would with the ARG/ENV defaults."""
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: variables.get(m.group(1), m.group(0)),
                  text)


def resolved(instructions: list[Instruction]) -> list[tuple[Instruction, str]]:
    """Every instruction with `$VAR` expanded by the ARG/ENV defaults in force there. A bare
    `ARG NAME` after FROM takes the default an `ARG NAME=value` before FROM gave, as in Docker."""
    variables: dict[str, str] = {}
    out = []
    for instruction in instructions:
        if instruction.keyword in ("ARG", "ENV"):
            for name, value in key_values(instruction.args).items():
                if value or instruction.keyword == "ENV" or name not in variables:
                    variables[name] = expand(value, variables)
        out.append((instruction, expand(instruction.args, variables)))
    return out


def pip_installs(instructions: list[Instruction]) -> list[tuple[list[str], list[str]]]:
    """For every `pip install` in a RUN: (options, requirement specs) after ARG/ENV expansion."""
    found = []
    for instruction, args in resolved(instructions):
        if instruction.keyword != "RUN":
            continue
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        commands: list[list[str]] = [[]]
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&"):
                commands.append([])
            else:
                commands[-1].append(token)
        for words in commands:
            for index in range(len(words) - 1):
                if words[index].endswith("pip") and words[index + 1] == "install":
                    options, specs, rest = [], [], iter(words[index + 2:])
                    for word in rest:
                        if word.startswith("-"):
                            options.append(word)
                            if word in PIP_VALUE_OPTIONS:
                                options.append(next(rest))
                        else:
                            specs.append(word)
                    found.append((options, specs))
    return found


@pytest.fixture(params=sorted(DOCKERFILES), ids=lambda name: name)
def dockerfile(request):
    path, base, torch_index = DOCKERFILES[request.param]
    return parse_dockerfile(path.read_text()), base, torch_index


def test_parser_rejects_garbage():
    with pytest.raises(ValueError, match="unknown instruction"):
        parse_dockerfile("FROM x:1\nRUNN echo\n")
    with pytest.raises(ValueError, match="continued line"):
        parse_dockerfile("FROM x:1\nRUN echo \\\n")
    with pytest.raises(ValueError, match="start with FROM"):
        parse_dockerfile("RUN echo\n")


def _base_image(instructions: list[Instruction]) -> str:
    froms = [(i, args) for i, args in resolved(instructions) if i.keyword == "FROM"]
    assert froms, "no FROM"
    return froms[-1][1].split()[0]


def test_base_image_is_pinned(dockerfile):
    instructions, base, _ = dockerfile
    before_from = {}
    for instruction in instructions:
        if instruction.keyword == "FROM":
            break
        before_from.update(key_values(instruction.args))
    for instruction, image in resolved(instructions):
        if instruction.keyword != "FROM":
            continue
        for name in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", instruction.args):
            assert before_from.get(name), f"line {instruction.line}: ${name} has no default before FROM"
        image = image.split()[0]
        name, _, tag = image.rpartition(":")
        assert name and tag and "/" not in tag, f"line {instruction.line}: {image} has no tag"
        assert tag != "latest" and "$" not in image, f"line {instruction.line}: {image} is not pinned"
    assert re.fullmatch(base, _base_image(instructions)), f"base {_base_image(instructions)} is not {base}"


def test_torch_build_matches_the_base_image(dockerfile):
    """The torch wheel's platform is the base image's: CPU with CPU, and for CUDA a variant both
    torch 2.13 and the Ray 2.60 images publish (not `-gpu`, which is CUDA 12.1, nor cu128)."""
    instructions, base, torch_index = dockerfile
    platform = re.fullmatch(base, _base_image(instructions)).group(1)
    if platform != "cpu":
        assert platform in TORCH_2_13_CUDA & RAY_2_60_CUDA, (
            f"rayproject/ray {platform}: torch 2.13 publishes {sorted(TORCH_2_13_CUDA)}")
    torch_installs = [options for options, specs in pip_installs(instructions)
                      if any(canonicalize_name(Requirement(s).name) == "torch" for s in specs
                             if not s.startswith("."))]
    assert len(torch_installs) == 1, "torch is installed once, on its own"
    options = torch_installs[0]
    assert options[options.index("--index-url") + 1] == torch_index.format(platform)


def test_project_installs_from_the_lock(dockerfile):
    instructions, _, _ = dockerfile
    copied = " ".join(i.args for i in instructions if i.keyword == "COPY")
    assert "constraints.txt" in copied, "constraints.txt is not copied into the image"
    for options, specs in pip_installs(instructions):
        if any(spec == "." or spec.startswith(".[") for spec in specs):
            assert options[options.index("-c") + 1] == "constraints.txt", options


def test_runs_as_non_root_user(dockerfile):
    instructions, _, _ = dockerfile
    users = [i.args.split(":")[0] for i in instructions if i.keyword == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1] not in ("root", "0"), f"final USER is {users[-1]}"
    assert users[-1] == "ray", "use the base image's unprivileged `ray` user"
    last_user = max(i.line for i in instructions if i.keyword == "USER")
    for instruction in instructions:
        if instruction.keyword == "RUN" and instruction.line > last_user:
            assert not re.search(r"\bsudo\b", instruction.args), "no sudo after dropping root"


def test_no_secrets_in_env_or_arg(dockerfile):
    instructions, _, _ = dockerfile
    for instruction in instructions:
        if instruction.keyword not in ("ENV", "ARG", "LABEL"):
            continue
        for name, value in key_values(instruction.args).items():
            assert not SECRET_NAME.search(name), f"line {instruction.line}: {name} looks like a secret"
            assert not SECRET_VALUE.search(value), f"line {instruction.line}: {name} has a credential"
    for instruction in instructions:
        assert not SECRET_VALUE.search(instruction.args), f"line {instruction.line}: a credential"


def test_pip_installs_only_declared_packages(dockerfile):
    instructions, _, _ = dockerfile
    installs = pip_installs(instructions)
    assert installs, "the image installs nothing"
    declared = {canonicalize_name(r.name) for r in declared_requirements()}
    extras = set(pyproject()["project"].get("optional-dependencies", {}))
    saw_project, saw_torch = False, False
    for options, specs in installs:
        for spec in specs:
            if spec == "." or spec.startswith(".["):
                saw_project = True
                wanted = set(re.findall(r"[A-Za-z0-9_-]+", spec[2:-1])) if spec.startswith(".[") else set()
                assert wanted <= extras, (
                    f"pip install {spec}: extra(s) {sorted(wanted - extras)} are not declared in "
                    "pyproject.toml [project.optional-dependencies]")
                continue
            requirement = Requirement(spec)
            name = canonicalize_name(requirement.name)
            assert name in declared, f"pip install {spec}: {name} is not declared in pyproject.toml"
            if name == "torch":
                saw_torch = True
                assert str(requirement.specifier).startswith("=="), "torch must be pinned"
    assert saw_torch and saw_project


def test_torch_is_installed_before_the_project(dockerfile):
    instructions, _, _ = dockerfile
    order = [spec for _, specs in pip_installs(instructions) for spec in specs]
    assert order.index(next(s for s in order if s.startswith("torch"))) < order.index(
        next(s for s in order if s == "." or s.startswith(".[")))


def test_copied_sources_exist_and_context_is_small(dockerfile):
    instructions, _, _ = dockerfile
    for instruction in instructions:
        if instruction.keyword != "COPY":
            continue
        words = [w for w in instruction.args.split() if not w.startswith("--")]
        for source in words[:-1]:
            if source == "README.md":
                continue  # owned by the project root; pyproject's readme
            assert (REPO / source).exists(), f"line {instruction.line}: COPY {source} is missing"
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    required = {".venv", "data", "mlruns", "outputs", "multirun", "checkpoints", ".git",
                "bench/results"}
    assert required <= ignored, f".dockerignore misses {sorted(required - ignored)}"
