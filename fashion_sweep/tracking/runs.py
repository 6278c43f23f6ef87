"""MLflow training runs by id, in this process: the experiment, a run's records, its end.

Every call takes the run's id: several runs can be open at once (a pack's members) and
none is MLflow's "active run". `InProcess` is these calls as a Tracker (tracker.py).
"""

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
from mlflow.entities import Metric, Param
from mlflow.store.artifact.artifact_repo import ArtifactRepository
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from fashion_sweep import signals
from fashion_sweep.config import flatten
from fashion_sweep.tracking import sqlite_wal, stores
from fashion_sweep.tracking.redaction import one_line, redact

PROJECT_DIR = Path(__file__).resolve().parents[2]
# note: set before the first download; its progress bars would bury the tutorial's lines
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# ...and so would "View run at <server URL>", which also repeats any credentials in it
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
sqlite_wal.enable()  # before MLflow opens mlflow.db
# Set per trial by the sweeper and recorded as tags (and run name), not as params,
# so the UI's compare view shows only what differs in substance.
AS_TAGS = (
    "tracking.parent_run_id",
    "tracking.trial",
    "tracking.study",
    "tracking.run_name",
    "tracking.confirms",
)
KIND_TAG = "fashion_sweep.kind"  # "train" for a training run, "sweep" for a sweep's parent
EXPERIMENT_KIND = "mlflow.experimentKind"
YamlDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_EXPERIMENT_IDS: dict[tuple[str, str], str] = {}  # see use_experiment
_ARTIFACT_URIS: dict[str, str] = {}  # run id -> where its artifacts go, as created


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
    The address is checked first (stores.py) and the id looked up once per process (a
    sweep's trials share it); what fails is a StoreError in one line."""
    try:
        store = stores.absolute(uri)
    except ValueError:
        store = uri  # not an address: check() says so
    mlflow.set_tracking_uri(store)
    key = (store, experiment)
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


def artifacts(run_id: str) -> ArtifactRepository:
    """Where the run keeps its artifacts: known from the run as this process created it
    (MLflow's own log_artifact reads the whole run back from the store first)."""
    if run_id not in _ARTIFACT_URIS:
        _ARTIFACT_URIS[run_id] = MlflowClient().get_run(run_id).info.artifact_uri
    return get_artifact_repository(_ARTIFACT_URIS[run_id], tracking_uri=mlflow.get_tracking_uri())


def open_run(resolved: dict[str, Any], tags: dict[str, str], overrides: list[str]) -> str:
    """Starts a training run; its id. Logs the resolved config as dotted params and as
    config.yaml, and the overrides; `tags` come from the process that trains (its torch
    version, host and pid). A run that cannot be set up is ended before this raises."""
    tracking = resolved["tracking"]
    experiment_id = use_experiment(tracking["uri"], tracking["experiment"])
    client = MlflowClient()
    run = client.create_run(
        experiment_id, run_name=tracking["run_name"], tags=_run_tags(tracking, tags, overrides)
    )
    run_id = run.info.run_id
    _ARTIFACT_URIS[run_id] = run.info.artifact_uri
    try:
        params = [Param(key, value) for key, value in _params(resolved).items()]
        client.log_batch(run_id, params=params)
        _log_config_files(run_id, resolved, overrides)
    except KeyboardInterrupt as stop:
        end_run(run_id, "KILLED", signals.reason(stop))
        raise
    except BaseException as error:
        end_run(run_id, "FAILED", one_line(error))
        raise
    return run_id


def _run_tags(tracking: dict[str, Any], tags: dict[str, str], overrides: list[str]) -> dict:
    tags = {KIND_TAG: "train", **tags}
    if commit := git_commit():
        tags["git_commit"] = commit
    if tracking["parent_run_id"]:
        tags["mlflow.parentRunId"] = tracking["parent_run_id"]
    if tracking["trial"] is not None:
        tags["trial"] = str(tracking["trial"])
    if tracking.get("confirms") is not None:  # a sweep's confirmation run (confirm.py)
        tags["stage"] = "confirm"
        tags["confirms"] = str(tracking["confirms"])
    if overrides:
        tags["overrides"] = redact(" ".join(overrides))[:5000]
    return tags


def _params(resolved: dict[str, Any]) -> dict[str, str]:
    return {k: redact(str(v)) for k, v in flatten(resolved).items() if k not in AS_TAGS}


def _log_config_files(run_id: str, resolved: dict, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:  # one artifact call for both files
        for name, content in (("config.yaml", resolved), ("overrides.yaml", overrides)):
            text = yaml.dump(content, Dumper=YamlDumper, sort_keys=False)
            Path(tmp, name).write_text(redact(text))
        artifacts(run_id).log_artifacts(tmp)


def log_metrics(run_id: str, metrics: dict[str, float], epoch: int) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(key, value, now, epoch) for key, value in metrics.items()]
    MlflowClient().log_batch(run_id, metrics=batch)


def mark_pruned(run_id: str, epoch: int) -> None:
    MlflowClient().set_tag(run_id, "pruned", str(epoch))


def log_artifact(run_id: str, path: str) -> None:
    artifacts(run_id).log_artifact(path)


def log_model(run_id: str, state_dict: dict[str, Any]) -> None:
    """model.pth: exactly the tutorial's `torch.save(model.state_dict(), ...)`; none for
    a run ended meanwhile (a trial its sweep cut off: the run stays as the sweep ended it)."""
    import torch  # note: here, so the side process beside a single run never imports it

    if MlflowClient().get_run(run_id).info.status != "RUNNING":
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pth")
        torch.save(state_dict, path)
        log_artifact(run_id, path)


def end_run(
    run_id: str,
    status: str,
    reason: str | None = None,
    *,
    if_running: bool = False,
    anew: bool = False,
    uri: str | None = None,
) -> bool:
    """The one way a run ends: FINISHED, or FAILED/KILLED with its `failure_reason`.
    A run ended KILLED or FAILED stays as it ended: whatever comes later (a trial's
    process that outlived its sweep) does not rewrite it. With if_running, a FINISHED
    run is left as it ended too; with anew (a sweep's parent run, which each worker and
    resume reopens), the run ends as asked whatever it was. `uri` for a process that has
    not pointed MLflow at the store (use_experiment). True if it ended here."""
    client = MlflowClient(stores.absolute(uri) if uri else None)
    if not anew:
        ended = client.get_run(run_id).info.status
        if ended in ("KILLED", "FAILED") or (if_running and ended != "RUNNING"):
            return False
    if reason is not None:
        client.set_tag(run_id, "failure_reason", reason)
    client.set_terminated(run_id, status)
    return True


def forget() -> None:
    """Drops what this process keeps of its stores (tests running commands in one
    process)."""
    stores.forget()
    _EXPERIMENT_IDS.clear()
    _ARTIFACT_URIS.clear()


def preload() -> None:
    """Imports what opening a SQL store (the default, SQLite) imports, ahead of it."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


class InProcess:
    """The Tracker (tracker.py) in this process: each call done when it returns."""

    use_experiment = staticmethod(use_experiment)
    open_run = staticmethod(open_run)
    log_metrics = staticmethod(log_metrics)
    mark_pruned = staticmethod(mark_pruned)
    log_model = staticmethod(log_model)
    log_artifact = staticmethod(log_artifact)  # for the side process (side_process.py)

    def end_run(self, run: str, status: str, reason: str | None = None) -> None:
        end_run(run, status, reason)

    def run_id(self, run: str) -> str:
        return run

    def error(self, run: str) -> None:
        return None  # every error is raised by its call

    def sync(self) -> None:
        pass  # nothing is left pending

    def flush(self, abandon: bool = False) -> None:
        pass
