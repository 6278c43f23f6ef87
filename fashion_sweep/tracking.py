"""MLflow, and only here: one MLflow run per training run, and finding runs again."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.store.artifact.artifact_repo import ArtifactRepository
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from fashion_sweep import signals, sqlite_wal, stores
from fashion_sweep.config import flatten
from fashion_sweep.redaction import one_line, redact

PROJECT_DIR = Path(__file__).resolve().parents[1]
# note: set before the first download; its progress bars would bury the tutorial's lines
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# ...and so would "View run at <server URL>", which also repeats any credentials in it
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
sqlite_wal.enable()  # before MLflow opens mlflow.db
# Set per trial by the sweeper and recorded as tags (and run name), not as params,
# so the UI's compare view shows only what differs in substance.
AS_TAGS = ("tracking.parent_run_id", "tracking.trial", "tracking.study", "tracking.run_name")
KIND_TAG = "fashion_sweep.kind"  # "train" for a training run, "sweep" for a sweep's parent
EXPERIMENT_KIND = "mlflow.experimentKind"
YamlDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_EXPERIMENT_IDS: dict[tuple[str, str, str], str] = {}  # see use_experiment


@functools.cache  # the code this process runs: as it was when the process started
def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def use_experiment(uri: str, experiment: str, create: bool = True) -> str:
    """Points MLflow at `uri` and returns the experiment's id, creating it if needed
    (with create=False, a store or experiment that is not there is a LookupError).
    The address is checked first (fashion_sweep/stores.py) and the id looked up once
    per process (a sweep's trials share it); what fails is a StoreError in one line."""
    mlflow.set_tracking_uri(uri)
    key = (uri, experiment, os.getcwd())  # a relative sqlite:/// URI names a file here
    if key not in _EXPERIMENT_IDS:
        try:
            stores.check("tracking.uri", uri, must_exist=not create)
        except stores.StoreError as error:
            raise (error if create else LookupError(str(error))) from None
        with stores.first_use(uri):
            try:
                _EXPERIMENT_IDS[key] = _experiment_id(uri, experiment, create)
            except (LookupError, stores.StoreError):
                raise
            except Exception as error:  # the store's own: a bad URL, a refusal, a schema
                raise stores.StoreError(f"tracking.uri={redact(uri)}: {one_line(error)}") from None
    return _EXPERIMENT_IDS[key]


def _experiment_id(uri: str, experiment: str, create: bool) -> str:
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    if not create:
        raise LookupError(f"no experiment {experiment!r} in {redact(uri)}")
    try:
        # the UI then opens on the runs table (model training), not on GenAI traces
        return client.create_experiment(
            experiment,
            artifact_location=artifact_location(uri, experiment),
            tags={EXPERIMENT_KIND: "custom_model_development"},
        )
    except mlflow.exceptions.MlflowException:
        # another process created it first
        return client.get_experiment_by_name(experiment).experiment_id


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its runs' artifacts: beside a SQLite store, in
    `mlruns/<experiment>/` (MLflow's default is ./mlruns of whichever folder the
    process runs in); a server or another database: MLflow's choice."""
    path = stores.sqlite_path(uri)
    if path is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return str(path.resolve().parent / "mlruns" / slug)


def artifacts_of(run: mlflow.entities.Run) -> ArtifactRepository:
    """Where `run` keeps its artifacts, from the run as created: MLflow's own
    log_artifact(s) reads the whole run back from the store first."""
    return get_artifact_repository(run.info.artifact_uri, tracking_uri=mlflow.get_tracking_uri())


def start_run(resolved: dict[str, Any], tags: dict[str, str], overrides: list[str]) -> str:
    """open_run(), then the run is MLflow's active run until end_run."""
    run_id = open_run(resolved, tags, overrides).info.run_id
    mlflow.start_run(run_id=run_id)
    return run_id


def open_run(
    resolved: dict[str, Any], tags: dict[str, str], overrides: list[str]
) -> mlflow.entities.Run:
    """Starts a training run and returns it; not MLflow's active run, so that several
    can be open at once (the members of a pack, fashion_sweep/packing.py).

    Logs the resolved config as dotted params and as config.yaml, and the overrides;
    `tags` come from the process that trains (its torch version, host and pid).
    """
    tracking = resolved["tracking"]
    experiment_id = use_experiment(tracking["uri"], tracking["experiment"])
    client = MlflowClient()
    run = client.create_run(
        experiment_id, run_name=tracking["run_name"], tags=_run_tags(tracking, tags, overrides)
    )
    try:
        params = [Param(key, value) for key, value in _params(resolved).items()]
        client.log_batch(run.info.run_id, params=params)
        _log_config_files(run, resolved, overrides)
    except KeyboardInterrupt as stop:
        close_run(run.info.run_id, "KILLED", signals.reason(stop))
        raise
    except BaseException as error:
        close_run(run.info.run_id, "FAILED", one_line(error))
        raise
    return run


def log_run_metrics(run_id: str, metrics: dict[str, float], epoch: int) -> None:
    """log_epoch() for a run that is not the active one."""
    now = int(time.time() * 1000)
    batch = [Metric(key, value, now, epoch) for key, value in metrics.items()]
    MlflowClient().log_batch(run_id, metrics=batch)


def mark_run_pruned(run_id: str, epoch: int) -> None:
    """mark_pruned() for a run that is not the active one."""
    MlflowClient().set_tag(run_id, "pruned", str(epoch))


def close_run(run_id: str, status: str, reason: str | None = None) -> None:
    """end_run() for a run that is not the active one."""
    client = MlflowClient()
    if reason is not None:
        client.set_tag(run_id, "failure_reason", reason)
    client.set_terminated(run_id, status)


def _run_tags(tracking: dict[str, Any], tags: dict[str, str], overrides: list[str]) -> dict:
    tags = {KIND_TAG: "train", **tags}
    if commit := git_commit():
        tags["git_commit"] = commit
    if tracking["parent_run_id"]:
        tags["mlflow.parentRunId"] = tracking["parent_run_id"]
    if tracking["trial"] is not None:
        tags["trial"] = str(tracking["trial"])
    if overrides:
        tags["overrides"] = redact(" ".join(overrides))[:5000]
    return tags


def _params(resolved: dict[str, Any]) -> dict[str, str]:
    return {k: redact(str(v)) for k, v in flatten(resolved).items() if k not in AS_TAGS}


def _log_config_files(run: mlflow.entities.Run, resolved: dict, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:  # one artifact call for both files
        for name, content in (("config.yaml", resolved), ("overrides.yaml", overrides)):
            text = yaml.dump(content, Dumper=YamlDumper, sort_keys=False)
            Path(tmp, name).write_text(redact(text))
        artifacts_of(run).log_artifacts(tmp)


def end_run(status: str, reason: str | None = None) -> None:
    """Ends the active run: FINISHED, or FAILED/KILLED with its `failure_reason`."""
    if reason is not None:
        mlflow.set_tag("failure_reason", reason)
    mlflow.end_run(status)


def end_active_run(status: str, reason: str | None) -> None:
    """end_run(), if a run is still active."""
    if mlflow.active_run() is not None:
        end_run(status, reason)


def end_run_by_id(uri: str, run_id: str, status: str, reason: str | None) -> None:
    """Ends a run that another process started (its MLflow process died), if it is
    still RUNNING."""
    client = MlflowClient(uri)
    if client.get_run(run_id).info.status == "RUNNING":
        if reason is not None:
            client.set_tag(run_id, "failure_reason", reason)
        client.set_terminated(run_id, status)


def sync() -> None:
    """In this process every call is done when it returns (see Agent.sync)."""


def preload() -> None:
    """Imports what opening a SQL store (the default, SQLite) imports, ahead of it."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def log_epoch(metrics: dict[str, float], epoch: int) -> None:
    mlflow.log_metrics(metrics, step=epoch)


def mark_pruned(epoch: int) -> None:
    """Tags the active run as a trial its sweep's pruner stopped after `epoch`."""
    mlflow.set_tag("pruned", str(epoch))


def log_artifact(path: str) -> None:
    """A file (the run's model.pth) as an artifact of the active run."""
    artifacts_of(mlflow.active_run()).log_artifact(path)


def resolve_run_id(uri: str, experiment: str, run_id: str) -> str:
    """A run id as given, or `latest` (the newest finished training run with a model),
    or `best` (the newest sweep's best trial); a sweep's parent id also leads to its
    best trial. The run must have its model.pth. Opens the store read-only: a store or
    run that is not there is a LookupError."""
    experiment_id = use_experiment(uri, experiment, create=False)
    client = MlflowClient()
    if run_id == "latest":
        return _newest_with_model(client, experiment_id, experiment)
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
            raise LookupError(f"sweep run {run.info.run_id} has no best_run_id tag yet")
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
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        config = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="config.yaml", dst_path=tmp
        )
        weights = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="model.pth", dst_path=tmp
        )
        import torch

        return OmegaConf.load(config), torch.load(weights, map_location="cpu")


def open_sweep_run(
    uri: str, experiment: str, study_name: str, tags: dict[str, str], run_id: str | None
) -> str:
    """The parent run of a study's trials: `run_id` reopened (a resume, another
    worker), or a new one if there is none in this store."""
    experiment_id = use_experiment(uri, experiment)
    client = MlflowClient()
    try:
        if run_id is None:
            raise LookupError
        reopened = client.get_run(run_id)
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        if "failure_reason" in reopened.data.tags:  # why it stopped last time
            client.delete_tag(run_id, "failure_reason")
    except (LookupError, mlflow.exceptions.MlflowException):
        run_id = client.create_run(
            experiment_id, run_name=f"sweep {study_name}", tags={KIND_TAG: "sweep"}
        ).info.run_id
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    return run_id


def trial_run(uri: str, parent_run_id: str, trial: int) -> mlflow.entities.Run | None:
    """The child run that trial number `trial` of a sweep logged, if it got that far."""
    client = MlflowClient(uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.trial = '{trial}'",
        max_results=1,
    )
    return runs[0] if runs else None


def trial_run_id(uri: str, parent_run_id: str, trial: int) -> str | None:
    run = trial_run(uri, parent_run_id, trial)
    return run.info.run_id if run else None


def ended_as(run: mlflow.entities.Run, metric: str) -> float | str | None:
    """How a trial's run ended: the value of `metric` if it finished, the failure_reason
    if it failed on its own, None if it did not end (running, killed)."""
    if run.info.status == "FINISHED" and metric in run.data.metrics:
        return run.data.metrics[metric]
    if run.info.status == "FAILED" and "failure_reason" in run.data.tags:
        return run.data.tags["failure_reason"]
    return None


def kill_run(uri: str, run: mlflow.entities.Run | None, why: str) -> None:
    """Marks a cut-off trial's run KILLED, if it was still running."""
    if run is not None and run.info.status == "RUNNING":
        client = MlflowClient(uri)
        client.set_tag(run.info.run_id, "failure_reason", why)
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))


def close_sweep_run(
    run_id: str,
    error: BaseException | None,
    best: dict[str, Any] | None = None,
    metric: str = "",
    step: int = 0,
    figures: dict[str, Any] | None = None,
) -> None:
    """Ends the parent run: FINISHED with the best trial recorded, else FAILED/KILLED."""
    client = MlflowClient()
    if error is not None:
        killed = isinstance(error, KeyboardInterrupt)
        why = signals.reason(error) if killed else one_line(error)
        client.set_tag(run_id, "failure_reason", why)
        status = RunStatus.KILLED if killed else RunStatus.FAILED
        client.set_terminated(run_id, RunStatus.to_string(status))
        return
    if best and best.get("value") is not None:
        client.log_metric(run_id, metric, best["value"], step=step)
        tags = {"best_trial": str(best["trial"])}
        if best.get("run_id"):
            tags["best_run_id"] = best["run_id"]
        tags.update({f"best.{key}": str(value) for key, value in best["params"].items()})
        client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    if "failure_reason" in client.get_run(run_id).data.tags:  # another worker's interruption
        client.delete_tag(run_id, "failure_reason")
    for name, figure in (figures or {}).items():
        client.log_figure(run_id, figure, f"plots/{name}")
    client.set_tag(run_id, "mlflow.note.content", compare_note(run_id))
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


def compare_note(parent_run_id: str) -> str:
    """The parent run's description: a link to the compare view of all its trials."""
    client = MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    children = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    ids = ",".join(f'"{c.info.run_id}"' for c in children)
    link = f'#/compare-runs?runs=[{ids}]&experiments=["{experiment_id}"]'
    return f"[Compare the {len(children)} trials of this sweep side by side]({link})"
