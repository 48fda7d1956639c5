"""The pyfunc model MLflow logs from code ("models from code"): MLflow runs this file to build it.

Only MLflow imports this file, when it logs or loads a version (`ModelRegistry.log_bundle`): the
model object is code, not a pickle, so loading a version never deserialises arbitrary objects.
"""

import mlflow.models

from training.registry import RecommenderPyfunc

mlflow.models.set_model(RecommenderPyfunc())
