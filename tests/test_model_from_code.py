"""The registered model is logged as MLflow "model from code" (no pickle),
and a version logged by the previous, pickled, code still loads."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.model_support import class_jpegs


@pytest.fixture(scope="module")
def logged(trained_run, tmp_path_factory):
    """The model the session's real training run logged, and the same model logged the old way."""
    import mlflow

    from service.tracking import pyfunc

    mlflow.set_tracking_uri(trained_run.tracking_uri)  # the session's one server, as test_serving does
    new_uri = f"runs:/{trained_run.run_id}/model"
    folder = tmp_path_factory.mktemp("from-code")
    local = mlflow.artifacts.download_artifacts(new_uri, dst_path=str(folder / "download"))
    # What the previous version did: the pyfunc object, pickled by CloudPickle. In an
    # experiment of its own, without making it the process's active one (later tests
    # start runs in theirs).
    experiment = mlflow.MlflowClient(trained_run.tracking_uri).create_experiment("model-from-code")
    with mlflow.start_run(experiment_id=experiment, log_system_metrics=False) as run:
        mlflow.pyfunc.log_model(name="pickled", python_model=pyfunc.AlexNetPyfunc(),
                                artifacts={pyfunc.MODEL_FILES: str(Path(local) / "artifacts" / pyfunc.MODEL_FILES)},
                                signature=pyfunc.signature(), input_example=pyfunc.input_example(),
                                pip_requirements=["mlflow"])
    return new_uri, f"runs:/{run.info.run_id}/pickled", folder


def _top1(model, images: list[bytes]) -> list[str]:
    answer = model.predict(pd.DataFrame({"image": images}), params={"top_k": 1})
    return [row[0] for row in answer["wnids"]]


def test_the_logged_model_is_code_not_a_pickle(logged, tmp_path):
    import mlflow

    new_uri, _, _ = logged
    folder = Path(mlflow.artifacts.download_artifacts(new_uri, dst_path=str(tmp_path)))
    assert not list(folder.rglob("*.pkl")), sorted(p.name for p in folder.rglob("*"))
    assert "pyfunc_model.py" in (folder / "MLmodel").read_text()


def test_both_the_new_and_the_pickled_model_load_and_classify(logged):
    import mlflow

    from service.tracking.pyfunc import AlexNetPyfunc

    images, _ = class_jpegs(2, first_seed=100)
    answers = []
    for uri in logged[:2]:
        model = mlflow.pyfunc.load_model(uri)
        assert isinstance(model.unwrap_python_model(), AlexNetPyfunc)
        answers.append(_top1(model, images))
    assert answers[0] == answers[1] and len(answers[0]) == len(images), "the same weights, the same answers"


def test_input_without_the_image_column_is_refused_naming_it(logged):
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(logged[0])
    with pytest.raises(MlflowException) as raised:
        model.predict(pd.DataFrame({"picture": [b"\xff\xd8"]}))
    # MLflow's schema check refuses it before the model's code runs: the column it lacks,
    # the schema it accepts and the column it was given.
    message = str(raised.value)
    assert message.startswith("Failed to enforce schema of data '"), message
    assert message.endswith("' with schema '['image': binary (required)]'. Error: Model is missing inputs ['image']. "
                            "Note that there were extra inputs: ['picture']."), message
