"""The registered model: an MLflow pyfunc that classifies encoded images.

Input: a DataFrame with one binary column `image` (JPEG/PNG/... bytes); over
HTTP, `mlflow models serve` takes `{"dataframe_records": [{"image": "<base64>"}]}`
and base64-decodes the column because the signature says it is binary.
Optional param `top_k` (default 5). Output: one row per image with `wnids`,
`names` and `probabilities` of the top k classes, best first.

The preprocessing (shorter side, centre or 10 crops, mean/std) and the class
list travel with the weights in the model's `model_files` artifact
(`service.serving.classifier`), so the served model answers exactly what
`python -m service.evaluate` measured. A bad image raises an
`MlflowException` with INVALID_PARAMETER_VALUE, which the scoring server
turns into HTTP 400 with the message (no stack trace).

From Python, uint8 arrays work too:
`mlflow.pyfunc.load_model(uri).unwrap_python_model().classify([array])`.

Logged as a "model from code" (`pyfunc_model.py`): no CloudPickle in the
model. Versions registered before that hold a pickled `AlexNetPyfunc`;
CloudPickle stored the class by reference (module and name), so they load
into this same class as long as `service` is importable (tests/test_model_from_code.py).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import mlflow.pyfunc
import numpy as np
import pandas as pd

MODEL_FILES = "model_files"
# The file MLflow logs as the model's code (see its docstring).
MODEL_CODE = str(Path(__file__).with_name("pyfunc_model.py"))
IMAGE_COLUMN = "image"
OUTPUT_COLUMNS = ("wnids", "names", "probabilities")
MAX_IMAGES_PER_REQUEST = 256
DEFAULT_TOP_K = 5


def _invalid(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class AlexNetPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow's wrapper around `service.serving.classifier.Classifier`."""

    def load_context(self, context) -> None:
        from service.serving.classifier import Classifier, load_model_files

        card, state = load_model_files(context.artifacts[MODEL_FILES])
        self.classifier = Classifier(card, state)

    def classify(self, images: list, top_k: int = DEFAULT_TOP_K) -> list[dict]:
        """Top-k classes of encoded images or uint8 [H, W, 3] arrays (Python callers)."""
        from service.serving.preprocess import BadImage

        if len(images) > MAX_IMAGES_PER_REQUEST:
            raise _invalid(
                f"the request holds {len(images)} images; send at most {MAX_IMAGES_PER_REQUEST} per request"
            )
        if not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise _invalid(f"top_k={top_k!r}; send a positive integer")
        try:
            return self.classifier.top_k(list(images), int(top_k))
        except BadImage as error:
            raise _invalid(str(error)) from None

    # The DataFrame hint makes MLflow check the input against `signature()`
    # (a binary `image` column) before predict runs; a DataFrame hint infers
    # no schema of its own, so the explicit signature stays the contract.
    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict[str, Any]] = None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            if IMAGE_COLUMN not in model_input.columns:
                raise _invalid(f"the input has columns {list(model_input.columns)}; send one column '{IMAGE_COLUMN}'")
            images = list(model_input[IMAGE_COLUMN])
        elif isinstance(model_input, (list, tuple)):
            images = list(model_input)
        else:
            kind = type(model_input).__name__
            raise _invalid(f"the input is a {kind}; send a DataFrame with column '{IMAGE_COLUMN}'")
        top_k = (params or {}).get("top_k", DEFAULT_TOP_K)
        return pd.DataFrame(self.classify(images, top_k), columns=list(OUTPUT_COLUMNS))


def signature():
    """Binary `image` column in; top-k wnids, names, probabilities out; param `top_k`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, IMAGE_COLUMN)]),
        outputs=Schema(
            [
                ColSpec(Array(DataType.string), "wnids"),
                ColSpec(Array(DataType.string), "names"),
                ColSpec(Array(DataType.double), "probabilities"),
            ]
        ),
        params=ParamSchema([ParamSpec("top_k", DataType.long, DEFAULT_TOP_K)]),
    )


def input_example():
    """One small gray JPEG: MLflow checks with it, at logging time, that the model serves."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), (128, 128, 128)).save(buffer, format="JPEG")
    return pd.DataFrame({IMAGE_COLUMN: [buffer.getvalue()]})
