"""The registered model's code, logged as an MLflow "model from code".

`log_trained_model` hands MLflow this file's path instead of a pickled
object: MLflow copies it into the model and runs it at load time, where
`set_model` names the model. Nothing is unpickled, so loading runs only this
file and the `service` package it imports (installed where the model is
served: `--env-manager local` in the project's venv).
"""

from mlflow.models import set_model

from service.tracking.pyfunc import AlexNetPyfunc

set_model(AlexNetPyfunc())
