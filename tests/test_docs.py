"""The docs match the code: every `python -m service.<command> ...` line in
the README and docs/*.md is composed through that command's real Hydra
config and validation (a key renamed in the code, or a value the code
refuses, fails here), and every file path the README links exists."""

from __future__ import annotations

import importlib.util
import re
import shlex
import pytest

from service.config import Config, ConfigError, validate_config
from service.data.ingest import IngestConfig
from service.data.synthetic import SynthConfig
from service.evaluation.config import EvaluateConfig, validate_evaluate_config
from service.hydra_app import CONFIG_NAME, compose
from tests.helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# command -> (primary config, schema, validation)
HYDRA_COMMANDS = {
    "service.train": (CONFIG_NAME, Config, validate_config),
    "service.model": (CONFIG_NAME, Config, validate_config),
    "service.ingest": ("ingest", IngestConfig, IngestConfig.validate),
    "service.synth": ("synth", SynthConfig, SynthConfig.validate),
    "service.evaluate": ("evaluate", EvaluateConfig, validate_evaluate_config),
}
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
COMMAND = re.compile(r"^[^\n]*?python -m (service[\w.]*)((?:\\\n|[^\n])*)\n?(configuration error: .*)?", re.M)


def _overrides(text: str) -> list[str]:
    """key=value words of a documented command line: placeholders (<run id>)
    become x, optional [key=value] and a|b alternatives take their first
    form, a sweep its first point; elided values (key=...) are left out."""
    text = re.sub(r"<[^>]*>", "x", text.replace("\\\n", " ").split("  #")[0].split(" # ")[0])
    words = []
    for word in shlex.split(text.replace("[", " ").replace("]", " ").replace("'", "")):
        if "=" not in word or word.startswith("-") or word.endswith("=..."):
            continue
        key, value = word.split("=", 1)
        words.append(f"{key}={value.split('|')[0].split(',')[0]}")
    return words


def documented_commands() -> list[tuple[str, str, list[str], str]]:
    """(where, module, overrides, documented error) for every `python -m
    service...` command in a code block of the README and docs/."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for block in FENCE.finditer(text):
            for match in COMMAND.finditer(block.group(1)):
                line = text[: block.start(1)].count("\n") + block.group(1)[: match.start()].count("\n") + 1
                error = (match.group(3) or "").removeprefix("configuration error: ")
                found.append((f"{doc.name}:{line}", match.group(1), _overrides(match.group(2)), error))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_every_command():
    modules = {module for _, module, _, _ in COMMANDS}
    assert set(HYDRA_COMMANDS) <= modules, set(HYDRA_COMMANDS) - modules


@pytest.mark.parametrize("where, module, overrides, error", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_documented_command_composes_through_its_real_config(where, module, overrides, error):
    if module not in HYDRA_COMMANDS:
        assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
        return
    config_name, schema, validate = HYDRA_COMMANDS[module]
    if not overrides:  # `--help` and the like: the config composes (required keys are not given)
        validate = lambda cfg: None  # noqa: E731
    if error:  # the docs show this command failing: it must fail with the documented message
        with pytest.raises(ConfigError) as raised:
            compose(overrides, config_name, schema, validate)
        assert str(raised.value) == error
        return
    assert isinstance(compose(overrides, config_name, schema, validate), schema)


def test_files_the_readme_links_exist():
    readme = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme):
        assert (REPO / target).exists(), f"README links {target}, which does not exist"
