"""A trained model as an MLflow Model: logged with MLflow's PyTorch flavour (a signature
and an input example, so `mlflow.pyfunc.load_model` and `mlflow models serve` take it),
linked to a run, and registered under a name whose versions are the sweeps' winners."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import torch
from mlflow.models import infer_signature

import fashion_sweep
from fashion_sweep.tracking.stores import absolute


def log_model(
    uri: str, run_id: str, model: torch.nn.Module, example: torch.Tensor, name: str | None
) -> str:
    """Logs `model` as a model of run `run_id` (its Models column), registered as
    `name` unless that is empty; its URI: `models:/<name>/<version>` where registered,
    else the logged model's (`models:/m-...`). A run already registered as `name` is
    not registered again: that version's URI."""
    mlflow.set_tracking_uri(absolute(uri))
    client = mlflow.MlflowClient()
    if name:
        held = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if held:
            return f"models:/{name}/{max(int(v.version) for v in held)}"
    model = model.cpu().eval()
    with torch.no_grad():
        output = model(example)
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = mlflow.initialize_logged_model(
        name="model", source_run_id=run_id, experiment_id=experiment_id
    )
    quiet = contextlib.redirect_stderr(io.StringIO())  # "Successfully registered model ..."
    with quiet, _level("mlflow.pytorch", logging.ERROR):  # its caution on pickles: ours
        info = _log(model, logged.model_id, example, output, name)
    version = info.registered_model_version
    return f"models:/{name}/{version}" if name and version else info.model_uri


def _log(
    model: torch.nn.Module,
    model_id: str,
    example: torch.Tensor,
    output: torch.Tensor,
    name: str | None,
) -> Any:
    return mlflow.pytorch.log_model(
        model,
        name="model",
        model_id=model_id,
        signature=infer_signature(example.numpy(), output.numpy()),
        input_example=example.numpy(),
        registered_model_name=name or None,
        await_registration_for=0,
        # pickled, with the package's code saved beside it: any batch size (torch.export's
        # pt2 format fixes the example's)
        serialization_format="pickle",
        code_paths=[str(Path(fashion_sweep.__file__).parent)],
        # named, not inferred (inference loads the model in a new process: seconds)
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )


@contextlib.contextmanager
def _level(name: str, level: int) -> Iterator[None]:
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
