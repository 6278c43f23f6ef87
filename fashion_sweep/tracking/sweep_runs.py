"""A sweep's MLflow records: its parent run (opened, reopened on resume, closed with the
best trial, its plots and a link to compare its trials), and its trials' runs found by
trial number."""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.entities import RunStatus, RunTag
from mlflow.tracking import MlflowClient

from fashion_sweep import signals
from fashion_sweep.tracking.redaction import one_line
from fashion_sweep.tracking.runs import KIND_TAG, end_run, use_experiment
from fashion_sweep.tracking.stores import absolute


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
    log_tags(client, run_id, tags)
    return run_id


def trial_run(uri: str, parent_run_id: str, trial: int) -> mlflow.entities.Run | None:
    """The child run that trial number `trial` of a sweep logged, if it got that far."""
    client = MlflowClient(absolute(uri))
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


def kill_trial_run(uri: str, run: mlflow.entities.Run | None, why: str) -> None:
    """Ends a cut-off trial's run KILLED, if it was still running."""
    if run is not None and run.info.status == "RUNNING":
        end_run(run.info.run_id, "KILLED", why, uri=uri)


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
        if isinstance(error, KeyboardInterrupt):
            end_run(run_id, "KILLED", signals.reason(error))
        else:
            end_run(run_id, "FAILED", one_line(error))
        return
    if best and best.get("value") is not None:
        client.log_metric(run_id, metric, best["value"], step=step)
        tags = {"best_trial": str(best["trial"])}
        if best.get("run_id"):
            tags["best_run_id"] = best["run_id"]
        tags.update({f"best.{key}": str(value) for key, value in best["params"].items()})
        log_tags(client, run_id, tags)
    if "failure_reason" in client.get_run(run_id).data.tags:  # another worker's interruption
        client.delete_tag(run_id, "failure_reason")
    for name, figure in (figures or {}).items():
        client.log_figure(run_id, figure, f"plots/{name}")
    log_tags(client, run_id, {"mlflow.note.content": compare_note(run_id)})
    end_run(run_id, "FINISHED")


def log_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    """Sets the parent run's tags, which every worker of the sweep sets alike: when two
    write the same tag at once, the store refuses the second insert (a unique key), and
    what the other worker wrote is left where it is the same."""
    try:
        client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    except mlflow.exceptions.MlflowException:
        held = client.get_run(run_id).data.tags
        missing = {key: value for key, value in tags.items() if held.get(key) != value}
        if missing:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in missing.items()])


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
