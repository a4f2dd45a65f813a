"""values.schema.json restates a few rules of the service so `helm install` fails before any pod
starts; each must equal its one Python definition (or the Hydra config groups in conf/), so a
change on either side fails here instead of at a user's first training job."""

from __future__ import annotations

import json

import pytest

from deploy_support import CHART
from service import config
from tests.helpers import REPO

TRAINING = json.loads((CHART / "values.schema.json").read_text())["properties"]["training"]["properties"]


def _groups(name: str) -> list[str]:
    return sorted(path.stem for path in (REPO / "conf" / name).glob("*.yaml"))


@pytest.mark.parametrize(("value", "python"), [
    ("towers", list(config.ALLOWED_TOWERS)),
    ("model", list(config.MODEL_NAMES)),
    ("gradCompression", list(config.GRAD_COMPRESSIONS)),
    ("resume", list(config.RESUME_MODES)),
    ("recipe", _groups("recipe")),
    ("cluster", _groups("cluster")),
    ("experiment", [""] + _groups("experiment")),
])
def test_schema_enum_matches_the_service(value, python):
    assert sorted(TRAINING[value]["enum"], key=str) == sorted(python, key=str), (
        f"values.schema.json training.{value} allows {TRAINING[value]['enum']}, the service {python}")


def test_schema_enums_reject_what_the_service_rejects(chart, helm, minimal_values):
    """The enum is enforced at render time: a tower count the service refuses fails `helm install`."""
    refused = max(config.ALLOWED_TOWERS) + 1
    values = {**minimal_values, "training": {**minimal_values["training"], "towers": refused}}
    with pytest.raises(helm.HelmValuesError, match="/training/towers"):
        chart.render(values, name="demo", namespace="ml")
