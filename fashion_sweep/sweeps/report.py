"""A sweep's answer, once its trials are done: optimization_results.yaml in the worker's
sweep folder, the parent run closed with the best trial and the plots, and the best
trial in the log."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

from fashion_sweep.sweeps import schedule
from fashion_sweep.tracking import sweep_runs

if TYPE_CHECKING:
    from fashion_sweep.sweeps.opening import Opened

log = logging.getLogger(__name__)


def finish(opened: Opened) -> None:
    metric = opened.metric
    found = results(opened)
    OmegaConf.save(OmegaConf.create(found), Path(opened.sweep_dir, "optimization_results.yaml"))
    sweep_runs.close_sweep_run(
        opened.parent,
        None,
        best={
            "value": found.get("best_value"),
            "params": found.get("best_params", {}),
            "run_id": found.get("best_run_id"),
            "trial": found.get("best_trial"),
        },
        metric=metric,
        step=found["finished"],
        figures=plots(opened.study),
    )
    log.info(f"Best trial: {found.get('best_trial')} {found.get('best_params')}")
    log.info(f"Best {metric}: {found.get('best_value')}")


def results(opened: Opened) -> dict[str, Any]:
    """What optimization_results.yaml holds: the counts, and the best trial."""
    trials = opened.study.get_trials(deepcopy=False)
    state = schedule.tally(trials)
    found: dict[str, Any] = {
        "name": "optuna",
        "study_name": opened.name,
        "optimized_metric": opened.metric,
        "n_trials": opened.n_trials,
        "finished": len(state.counted),
        "complete": sum(t.state == TrialState.COMPLETE for t in state.counted),
        "failed": len(state.failed),
        "cut_off": sum(schedule.cut_off(t) for t in trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "parent_run_id": opened.parent,
    }
    if found["complete"]:
        best = opened.study.best_trial
        found.update(
            best_trial=best.number,
            best_params=best.params,
            best_value=best.value,
            best_run_id=best.user_attrs.get("mlflow_run_id"),
        )
    return found


def plots(handle: optuna.Study) -> dict[str, Any]:
    """Optimisation history, parameter importances, lr x batch size; what can be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as vis

    complete = handle.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = sorted({p for t in complete for p in t.params})
    wanted = {"optimization_history.png": lambda: vis.plot_optimization_history(handle)}
    if any(t.intermediate_values for t in handle.get_trials(deepcopy=False)):  # a pruner
        wanted["intermediate_values.png"] = lambda: vis.plot_intermediate_values(handle)
    if len(complete) >= 2 and names:
        wanted["param_importances.png"] = lambda: vis.plot_param_importances(handle)
    if len(names) >= 2:
        pair = [n for n in ("optimizer.lr", "data.batch_size") if n in names] or names[:2]
        pair = pair if len(pair) == 2 else names[:2]
        wanted[f"{'_x_'.join(_slug(n) for n in pair)}.png"] = lambda: vis.plot_contour(
            handle, params=pair
        )
    figures = {}
    for name, draw in wanted.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = draw()
        except Exception as error:  # a plot that cannot be drawn must not fail the sweep
            log.warning(f"plot {name} skipped: {error}")
            continue
        axes = axes.flat[0] if hasattr(axes, "flat") else axes
        figures[name] = axes.get_figure()
    return figures


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name.rsplit(".", 1)[-1])
