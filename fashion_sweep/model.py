"""The import path every config, MLflow run and Optuna study records for the model
(`model._target_: fashion_sweep.model.NeuralNetwork`); the class lives in core/model.py.
Kept so that the logged runs and the studies made so far keep loading."""

from fashion_sweep.core.model import CLASSES, NeuralNetwork

__all__ = ["CLASSES", "NeuralNetwork"]
