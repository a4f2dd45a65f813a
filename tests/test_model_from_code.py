"""The registered model is logged as MLflow "model from code" (no pickle),
and a version logged by the previous, pickled, code still loads."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from service.config import TrackingConfig
from tests.model_support import RESIZE_SIZE, class_jpegs, tiny_meta, train_checkpoint


@pytest.fixture(scope="module")
def logged(mlflow_server, tmp_path_factory):
    """One run holding the model as training logs it now, and the same model logged the old way."""
    import mlflow

    from service.tracking import pyfunc
    from service.tracking.mlflow_tracker import finish_run, open_run
    from service.tracking.registry import log_trained_model

    folder = tmp_path_factory.mktemp("from-code")
    train_checkpoint(folder / "checkpoint")
    tracking = TrackingConfig(uri=mlflow_server.url, experiment="model-from-code", registered_model="")
    handle = open_run(tracking, "from-code", {})
    log_trained_model(handle, str(folder / "checkpoint"), tiny_meta(), tracking, resize_size=RESIZE_SIZE)
    new_uri = f"runs:/{handle.run_id}/model"
    # What the previous version did: the pyfunc object, pickled by CloudPickle.
    local = mlflow.artifacts.download_artifacts(new_uri, dst_path=str(folder / "download"))
    with mlflow.start_run(run_id=handle.run_id, log_system_metrics=False):
        mlflow.pyfunc.log_model(name="pickled", python_model=pyfunc.AlexNetPyfunc(),
                                artifacts={pyfunc.MODEL_FILES: str(Path(local) / "artifacts" / pyfunc.MODEL_FILES)},
                                signature=pyfunc.signature(), input_example=pyfunc.input_example(),
                                pip_requirements=["mlflow"])
    finish_run(handle)
    return new_uri, f"runs:/{handle.run_id}/pickled", folder


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
    from tests.model_support import WNIDS

    images, labels = class_jpegs(2, first_seed=100)
    expected = [WNIDS[label] for label in labels]
    for uri in logged[:2]:
        model = mlflow.pyfunc.load_model(uri)
        assert isinstance(model.unwrap_python_model(), AlexNetPyfunc)
        assert _top1(model, images) == expected, uri


def test_input_without_the_image_column_is_refused_naming_it(logged):
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(logged[0])
    with pytest.raises(MlflowException, match="image"):
        model.predict(pd.DataFrame({"picture": [b"\xff\xd8"]}))
