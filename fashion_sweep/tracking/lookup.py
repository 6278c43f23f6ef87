"""Finding a logged run again, for predict: by id, `latest`, `best`, or a model's URI
(`models:/<name>/<version|latest>`), and reading back its config.yaml and model.pth."""

from __future__ import annotations

import tempfile
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from fashion_sweep.tracking.redaction import redact
from fashion_sweep.tracking.runs import KIND_TAG, use_experiment
from fashion_sweep.tracking.stores import absolute


def resolve_run_id(uri: str, experiment: str, run_id: str) -> str:
    """A run id as given, or `latest` (the newest finished training run with a model),
    or `best` (the newest sweep's best trial); a sweep's parent id also leads to its
    best trial. The run must have its model.pth. Opens the store read-only: a store or
    run that is not there is a LookupError."""
    experiment_id = use_experiment(uri, experiment, create=False)
    client = MlflowClient()
    if run_id == "latest":
        return _newest_with_model(client, experiment_id, experiment)
    if run_id.startswith("models:/"):
        run_id = _run_of_model(client, run_id)
    if run_id == "best":
        runs = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{KIND_TAG}` = 'sweep' and attributes.status = 'FINISHED'",
            order_by=["attributes.end_time DESC"],
            max_results=1,
        )
        if not runs:
            raise LookupError(f"run_id=best: no finished sweep in {experiment!r}")
        run = runs[0]
    else:
        try:
            run = client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            raise LookupError(f"run_id={run_id}: no such run in {redact(uri)}") from None
    if run.data.tags.get(KIND_TAG) == "sweep":
        best = run.data.tags.get("best_run_id")
        if not best:
            raise LookupError(f"sweep run {run.info.run_id} has no best trial: {_why_no_best(run)}")
        run = client.get_run(best)
    if not _has_model(client, run):
        raise LookupError(f"run {run.info.run_id} has no model.pth: {_why_no_model(run)}")
    return run.info.run_id


def _has_model(client: MlflowClient, run: mlflow.entities.Run) -> bool:
    return any(a.path == "model.pth" for a in client.list_artifacts(run.info.run_id))


def _why_no_model(run: mlflow.entities.Run) -> str:
    if run.data.params.get("tracking.log_model") == "False":
        return "it ran with tracking.log_model=false"
    if run.info.status != "FINISHED":
        reason = run.data.tags.get("failure_reason")
        return f"it is {run.info.status}" + (f" ({reason})" if reason else "")
    return "it was not logged"


def _newest_with_model(client: MlflowClient, experiment_id: str, experiment: str) -> str:
    """The newest FINISHED training run that has a model.pth (a run with
    tracking.log_model=false has none)."""
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{KIND_TAG}` = 'train' and attributes.status = 'FINISHED'",
            order_by=["attributes.end_time DESC"],
            max_results=100,
            page_token=token,
        )
        for run in page:
            if _has_model(client, run):
                return run.info.run_id
        token = page.token
        if not token:
            raise LookupError(f"run_id=latest: no finished run with a model in {experiment!r}")


def load_run(uri: str, run_id: str) -> tuple[DictConfig, dict[str, Any]]:
    """A logged run's config.yaml and model.pth state_dict (on the CPU)."""
    mlflow.set_tracking_uri(absolute(uri))
    with tempfile.TemporaryDirectory() as tmp:
        config = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="config.yaml", dst_path=tmp
        )
        weights = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="model.pth", dst_path=tmp
        )
        import torch

        return OmegaConf.load(config), torch.load(weights, map_location="cpu")


def _run_of_model(client: MlflowClient, uri: str) -> str:
    """The run a model URI was logged from: `models:/<name>/<version|latest>` (a
    registered model) or `models:/<model id>`."""
    parts = uri.removeprefix("models:/").split("/")
    try:
        if len(parts) == 1:
            return mlflow.get_logged_model(parts[0]).source_run_id
        name, version = parts
        if version == "latest":
            found = client.search_model_versions(
                f"name = '{name}'", order_by=["version_number DESC"], max_results=1
            )
            if not found:
                raise LookupError
            return found[0].run_id
        return client.get_model_version(name, version).run_id
    except (LookupError, ValueError, mlflow.exceptions.MlflowException):
        raise LookupError(f"run_id={uri}: no such model in the store") from None


def _why_no_best(run: mlflow.entities.Run) -> str:
    front = run.data.tags.get("pareto_front_trials")
    if front:  # a multi-objective sweep: no one best
        return (
            f"it is a multi-objective sweep, whose Pareto front is trials {front}: pick "
            f"one by its run id (MLflow's UI: tags.pareto_front = 'true')"
        )
    status = run.info.status
    if status == "RUNNING":
        return "it is running, and no trial has completed yet"
    reason = run.data.tags.get("failure_reason")
    return f"it ended {status}{f' ({reason})' if reason else ''} with no trial completed"
