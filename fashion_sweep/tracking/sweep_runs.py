"""A sweep's MLflow records: its parent run (opened, reopened on resume, closed with the
best trial, its plots and a link to compare its trials), and its trials' runs found by
trial number."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import mlflow
from mlflow.entities import Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from fashion_sweep import signals
from fashion_sweep.tracking import links
from fashion_sweep.tracking.names import in_config, to_mlflow
from fashion_sweep.tracking.redaction import one_line
from fashion_sweep.tracking.runs import KIND_TAG, end_run, use_experiment
from fashion_sweep.tracking.stores import absolute

VIEW_TAG = "mlflow.sharedViewState."  # an experiment tag: a view of its runs table


def open_sweep_run(
    uri: str,
    experiment: str,
    name: str,
    tags: dict[str, str],
    run_id: str | None,
    params: dict[str, str] | None = None,
) -> str:
    """The parent run of a study's trials: `run_id` reopened (a resume, another
    worker), or a new one if there is none in this store; named `name`, with the
    sweep's space and fixed values as params."""
    experiment_id = use_experiment(uri, experiment)
    client = MlflowClient()
    try:
        if run_id is None:
            raise LookupError
        reopened = client.get_run(run_id)
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING), name=name)
        if "failure_reason" in reopened.data.tags:  # why it stopped last time
            client.delete_tag(run_id, "failure_reason")
    except (LookupError, mlflow.exceptions.MlflowException):
        run_id = client.create_run(
            experiment_id, run_name=name, tags={KIND_TAG: "sweep"}
        ).info.run_id
    try:
        log_tags(client, run_id, tags)
        log_params(client, run_id, params or {})
    except BaseException as error:  # a name or value MLflow refuses: not left RUNNING
        close_sweep_run(run_id, error)
        raise
    return run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    """Logs the params the run does not hold yet (a run's params cannot change; every
    worker and resume of a study has the same ones, study.check_definition holds them)."""
    held = client.get_run(run_id).data.params
    new = [Param(key, value[:6000]) for key, value in params.items() if key not in held]
    with contextlib.suppress(mlflow.exceptions.MlflowException):  # another worker's, just now
        client.log_batch(run_id, params=new)


def share_view(parent_run_id: str, metric: str, maximize: bool, params: list[str]) -> str:
    """A view of the runs table for the sweep's trials, best first, with the metric,
    its test counterpart and the searched params as columns (MLflow 3.17 reads a view
    from the experiment tag `mlflow.sharedViewState.<key>`, opened by its link:
    links.view). The link, relative to the UI."""
    client = MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    shown = [metric, f"test/{metric.split('/', 1)[-1]}"]
    state = {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        "orderByKey": f"metrics.`{metric}`",
        "orderByAsc": not maximize,
        "selectedColumns": [
            *(f"metrics.`{key}`" for key in dict.fromkeys(shown)),
            *(f"params.`{in_config(key)}`" for key in params),
        ],
    }
    client.set_experiment_tag(experiment_id, f"{VIEW_TAG}{parent_run_id}", json.dumps(state))
    return links.view(experiment_id, parent_run_id)


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


def open_trial_run(
    uri: str, parent_run_id: str | None, trial: int, name: str, params: dict[str, Any]
) -> str:
    """A trial's run under the sweep's parent run, made before its job starts (for an app
    that logs to MLflow itself: apps.MlflowApp), with the trial's params."""
    client = MlflowClient(uri)
    experiment_id = client.get_run(str(parent_run_id)).info.experiment_id
    tags = {"mlflow.parentRunId": str(parent_run_id), "trial": str(trial), KIND_TAG: "trial"}
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    logged = [Param(in_config(key), str(value)[:6000]) for key, value in params.items()]
    client.log_batch(run_id, params=logged)
    return run_id


def end_trial_run(
    uri: str,
    run_id: str,
    values: dict[str, float],
    step: int,
    pruned: int | None = None,
    failed: str | None = None,
) -> None:
    """A trial's run, as its trial ended (apps.MlflowApp): its `values` logged at `step`
    (its last), `pruned` after that step or `failed` for that reason, and the run ended
    so where the app left it running."""
    client = MlflowClient(absolute(uri))
    for metric, value in values.items():
        client.log_metric(run_id, metric, value, step=step)
    if pruned is not None:  # FINISHED, as a pruned trial of ours: an app's `with
        # mlflow.start_run()` ended it FAILED on optuna.TrialPruned
        client.set_tag(run_id, "pruned", str(pruned))
        end_run(run_id, "FINISHED", anew=True, uri=uri)
    elif failed is not None:
        end_run(run_id, "FAILED", failed, if_running=True, uri=uri)
    else:
        end_run(run_id, "FINISHED", if_running=True, uri=uri)


def trial_run_id(uri: str, parent_run_id: str, trial: int) -> str | None:
    run = trial_run(uri, parent_run_id, trial)
    return run.info.run_id if run else None


def ended_as(run: mlflow.entities.Run, metrics: list[str]) -> Any:
    """How a trial's run ended: the value of each of `metrics` if it finished (one: a
    float), the failure_reason if it failed on its own, None if it did not end
    (running, killed)."""
    held = run.data.metrics
    if run.info.status == "FINISHED" and all(m in held for m in metrics):
        return held[metrics[0]] if len(metrics) == 1 else [held[m] for m in metrics]
    if run.info.status == "FAILED" and "failure_reason" in run.data.tags:
        return run.data.tags["failure_reason"]
    return None


def kill_trial_run(uri: str, run: mlflow.entities.Run | None, why: str) -> None:
    """Ends a cut-off trial's run KILLED, if it was running when `run` was read: also if
    its process, still alive, has ended it FINISHED since (the study holds the trial cut
    off, its configuration runs again); one it ended KILLED or FAILED stays so."""
    if run is not None and run.info.status == "RUNNING":
        end_run(run.info.run_id, "KILLED", why, uri=uri)


def close_sweep_run(
    run_id: str,
    error: BaseException | None,
    found: dict[str, Any] | None = None,
    figures: dict[str, Any] | None = None,
    pages: dict[str, str] | None = None,
    trials: tuple[str, list[mlflow.entities.Run]] | None = None,
) -> None:
    """Ends the parent run: FINISHED with the best trial of `found` (report.results)
    recorded, its plots (`figures`, `pages` of HTML) and a summary as its description;
    else FAILED/KILLED. `trials`: trials_of(run_id), where the caller has it."""
    client = MlflowClient()
    if error is not None:
        if isinstance(error, KeyboardInterrupt):
            end_run(run_id, "KILLED", signals.reason(error), anew=True)
        else:
            end_run(run_id, "FAILED", one_line(error), anew=True)
        return
    found = found or {}
    if found.get("best_value") is not None:
        metric = found["optimized_metric"]
        client.log_metric(run_id, metric, found["best_value"], step=found["finished"])
        tags = {"best_trial": str(found["best_trial"])}
        if found.get("best_run_id"):
            tags["best_run_id"] = found["best_run_id"]
        best = found["best_params"].items()
        tags.update({f"best.{to_mlflow(key)}": str(value) for key, value in best})
        stage = found.get("confirmation")
        if stage and stage["configurations"]:  # the winner by its mean over new seeds
            winner = stage["configurations"][0]
            tags["search_best_trial"] = str(found["search_best"]["trial"])
            tags["confirm"] = f"top_k={stage['top_k']} seeds={stage['seeds']}"
            tags["confirmed_winner_trial"] = str(winner["trial"])
            for name in (metric, "test/accuracy", "test/loss"):
                if name in winner:
                    spread = winner[name]
                    low, high = spread["ci95"]
                    values = {"mean": spread["mean"], "sd": spread["sd"], "ci95_low": low}
                    values["ci95_high"] = high
                    for what, value in values.items():
                        if value is not None:
                            client.log_metric(run_id, f"confirmed/{name}/{what}", value)
        log_tags(client, run_id, tags)
    if found.get("solutions"):  # a multi-objective study: its front, on each trial's run too
        front = {s["run_id"]: s["trial"] for s in found["solutions"] if s.get("run_id")}
        log_tags(client, run_id, {"pareto_front_trials": ",".join(map(str, front.values()))})
        trials = trials or trials_of(run_id)
        for child in trials[1]:
            on = "true" if child.info.run_id in front else "false"
            client.set_tag(child.info.run_id, "pareto_front", on)
    if "failure_reason" in client.get_run(run_id).data.tags:  # another worker's interruption
        client.delete_tag(run_id, "failure_reason")
    for name, figure in (figures or {}).items():
        client.log_figure(run_id, figure, f"plots/{name}", save_kwargs={"bbox_inches": "tight"})
    for name, page in (pages or {}).items():
        client.log_text(run_id, page, f"plots/{name}")
    trials = trials or trials_of(run_id)
    note = summary(run_id, found, list(figures or {}), list(pages or {}), trials)
    log_tags(client, run_id, {"mlflow.note.content": note})
    end_run(run_id, "FINISHED", anew=True)


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


def trials_of(parent_run_id: str) -> tuple[str, list[mlflow.entities.Run]]:
    """The experiment of a sweep's parent run, and its trials' runs, oldest first."""
    client = MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    children = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    return experiment_id, children


def metrics_of(run_id: str) -> dict[str, float]:
    """A run's metrics (their last values)."""
    return MlflowClient().get_run(run_id).data.metrics


def best_of(children: list[mlflow.entities.Run], found: dict[str, Any]) -> Any:
    """The best trial's run among a sweep's, if there is one."""
    return next((c for c in children if c.info.run_id == found.get("best_run_id")), None)


def numbers(run: mlflow.entities.Run, mark: str = "") -> str:
    """A run's validation and test numbers: `test/accuracy 0.7735, ...` (`mark` around
    each value, `**` for bold)."""
    metrics = run.data.metrics
    shown = sorted(k for k in metrics if k.split("/")[0] in ("val", "test")) or sorted(metrics)
    return ", ".join(f"{key} {mark}{metrics[key]:.4g}{mark}" for key in shown)


def summary(
    parent_run_id: str,
    found: dict[str, Any],
    images: list[str],
    pages: list[str],
    trials: tuple[str, list[mlflow.entities.Run]],
) -> str:
    """The parent run's description (markdown): the best trial, linked, with its
    numbers; the counts; a link to compare the trials; the plots. `trials`: trials_of."""
    experiment_id, children = trials
    lines = []
    best = best_of(children, found)
    if best is not None:
        lines.append(
            f"**Best: [{best.info.run_name}]({links.run(experiment_id, best.info.run_id)})**"
            f" ({found['optimized_metric']}): {numbers(best, '**')}"
        )
    if found.get("solutions"):  # a multi-objective study's Pareto front
        names = found["optimized_metric"]
        lines.append(f"**Pareto front** ({', '.join(names)}): {len(found['solutions'])} trials")
        for s in found["solutions"]:
            values = ", ".join(f"{m} {v:.4g}" for m, v in zip(names, s["values"], strict=True))
            where = links.run(experiment_id, s["run_id"]) if s.get("run_id") else None
            name = f"[trial {s['trial']}]({where})" if where else f"trial {s['trial']}"
            lines.append(f"- {name}: {values}")
    if stage := found.get("confirmation"):
        lines.append(f"Confirmed with {stage['seeds']} new seeds each (mean, 95% interval):")
        lines += [f"Not confirmed: {c['label']}, all its runs failed" for c in stage["unconfirmed"]]
        for place, c in enumerate(stage["configurations"], 1):
            spread = c[found["optimized_metric"]]
            low, high = spread["ci95"]
            interval = f" [{low:.4f}, {high:.4f}]" if low is not None else ""
            lines.append(
                f"{place}. {c['label']}: {spread['mean']:.4f}{interval}"
                f" (the search's #{c['search_rank']}: {c['search_value']:.4g})"
            )
    counts = ", ".join(
        f"{found[key]} {key}" for key in ("complete", "pruned", "failed") if found.get(key)
    )
    if found.get("cut_off"):  # their runs KILLED, their configurations run again
        counts += f"; {found['cut_off']} cut off and run again"
    ids = [c.info.run_id for c in children]
    lines.append(
        f"{found.get('finished', len(ids))} of {found.get('n_trials', len(ids))} trials"
        f" finished ({counts or 'none'}): "
        f"[the trials, best first]({links.view(experiment_id, parent_run_id)}); "
        f"[compare the {len(ids)} runs side by side]({links.compare(experiment_id, ids)})"
    )
    if found.get("best_model_uri"):
        lines.append(
            f'Its model: `mlflow.pyfunc.load_model("{found["best_model_uri"]}")` '
            f"(Models column, and the Model registry)"
        )
    if pages:
        shown = ", ".join(
            f"[{name}]({links.artifact(parent_run_id, f'plots/{name}')})" for name in pages
        )
        lines.append(f"Interactive plots (Artifacts, plots/): {shown}")
    for name in images:
        title = name.rsplit(".", 1)[0].replace("_", " ")
        lines.append(f"![{title}]({links.artifact(parent_run_id, f'plots/{name}')})")
    return "\n\n".join(lines)
