"""A sweep's answer, once its trials are done: optimization_results.yaml in the worker's
sweep folder; the parent run closed with the best trial, a summary as its description,
static plots and Optuna's interactive ones (plots/sweep.html); and on the console, the
best trial's numbers, the links to look at them and the command that uses its model."""

from __future__ import annotations

import html
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from fashion_sweep.sweeps import confirm, schedule
from fashion_sweep.tracking import links, sweep_runs
from fashion_sweep.tracking.redaction import redact

if TYPE_CHECKING:
    from fashion_sweep.sweeps.opening import Opened

log = logging.getLogger(__name__)


def finish(opened: Opened, config: DictConfig) -> None:
    """The answer first (optimization_results.yaml, the best trial's line), then what
    takes seconds (the winner registered as an MLflow Model, the plots), then where to
    look."""
    tracked = opened.parent is not None  # an app with MLflow runs (apps.py)
    trials = sweep_runs.trials_of(opened.parent) if tracked else ("", [])
    found = results(opened, OmegaConf.select(config, "hydra.sweeper.confirm"), trials[1])
    path = Path(opened.sweep_dir, "optimization_results.yaml")
    OmegaConf.save(OmegaConf.create(found), path)
    for text in answer(opened, found, trials):
        log.info(text)
    model = None
    if opened.app.has_model:  # torch and the model's code: this app's sweeps alone
        from fashion_sweep.sweeps import winner

        model = winner.register(config, found.get("best_run_id"))
    if model:
        found["best_model_uri"] = model
        OmegaConf.save(OmegaConf.create(found), path)
    searched = search_view(opened.study)  # the plots are the search's; the stage has its own
    what = Drawable.of(searched)
    figures = plots(searched, opened.metrics, what)
    if found.get("confirmation", {}).get("configurations"):
        figures["confirmed.png"] = confirmed_figure(found)
    pages = {"sweep.html": page(opened, what, searched)}
    try:
        if tracked:
            sweep_runs.close_sweep_run(opened.parent, None, found, figures, pages, trials)
        else:
            save_plots(Path(opened.sweep_dir, "plots"), figures, pages)
    finally:
        import matplotlib.pyplot as plt

        for figure in figures.values():
            plt.close(figure)
    for text in where_to_look(opened, config, found, path, trials):
        log.info(text)


def answer(opened: Opened, found: dict[str, Any], trials: tuple) -> list[str]:
    """The console's answer: the best trial and its numbers (`trials`:
    sweep_runs.trials_of)."""
    said = [f"Search space used up: {opened.all_run()}"] if opened.used_up else []
    said += confirmed(found)
    if opened.multi:
        return [*said, *front(found)]
    if opened.parent is None:
        if "best_trial" not in found:
            return [*said, "No trial completed: there is no best trial"]
        from fashion_sweep.sweeps.progress import label

        best = f"{label(found['best_trial'], found['best_params'])}: {opened.metric}"
        return [*said, f"Best: {best} {found['best_value']:.6g}"]
    best = sweep_runs.best_of(trials[1], found)
    winners = found.get("confirmation", {}).get("configurations")
    if best is not None and winners:  # one seed's numbers: the table above has the mean
        seeds = winners[0][opened.metric]["n"]
        said.append(
            f"The winner's model, the best of its {seeds} seeds by {opened.metric}: "
            f"{best.info.run_name}: {sweep_runs.numbers(best)}"
        )
    elif best is not None:
        said.append(f"Best: {best.info.run_name}: {sweep_runs.numbers(best)}")
    else:
        said.append("No trial completed: there is no best trial")
    return said


def where_to_look(
    opened: Opened, config: DictConfig, found: dict[str, Any], path: Path, trials: tuple
) -> list[str]:
    """What the console says after the answer: where to look at the trials, and how to
    use the best one's model. `trials`: sweep_runs.trials_of."""
    if opened.parent is None:
        plotted = Path(opened.sweep_dir, "plots", "sweep.html")
        return [f"Plots: {plotted}", f"Results: {path}"]
    uri = str(opened.app.tracking_uri)
    experiment_id, children = trials
    ui = links.ui(uri)
    best = sweep_runs.best_of(children, found)
    ids = [c.info.run_id for c in children]
    said = [
        f"Trials, best first: {ui}/{links.view(experiment_id, opened.parent)}",
        f"Sweep run: {ui}/{links.run(experiment_id, opened.parent)}",
        f"Compare the trials: {ui}/{links.compare(experiment_id, ids)}",
        f"Plots: {ui}/{links.artifact(opened.parent, 'plots/sweep.html')}",
        f"Results: {path}",
    ]
    if ui == links.LOCAL_UI:
        said.append("(the links open once `mlflow ui` runs in this folder)")
    if found.get("best_model_uri"):
        said.append(f"Best model: mlflow.pyfunc.load_model({found['best_model_uri']!r})")
    if best is not None and opened.app.has_model:
        store = "" if uri == links.DEFAULT_STORE else f" tracking.uri={redact(uri)}"
        said.append(
            f"Predict with it: python -m fashion_sweep.predict run_id={best.info.run_id}{store}"
        )
    return said


def confirmed(found: dict[str, Any]) -> list[str]:
    """The console's lines on the confirmation stage: each configuration's mean and
    interval, and whether the search's best trial kept its place."""
    stage = found.get("confirmation")
    if not stage:
        return []
    metric = found["optimized_metric"]
    said = [
        f"Confirmed with {stage['seeds']} new seeds each ({metric}: mean ± half the 95% "
        f"interval, the search's own run left out):"
    ]
    for place, c in enumerate(stage["configurations"], 1):
        test = f"; test/accuracy {_shown(c['test/accuracy'])}" if "test/accuracy" in c else ""
        failed = f"; {c['failed']} failed" if c["failed"] else ""
        said.append(
            f"  {place}. {c['label']}: {_shown(c[metric])} "
            f"(the search's #{c['search_rank']}: {c['search_value']:.4g}){test}{failed}"
        )
    for c in stage["unconfirmed"]:
        said.append(f"  not confirmed: {c['label']}: all {c['failed']} of its runs failed")
    if not stage["configurations"]:
        return [*said, "No confirmation run completed: the answer is the search's best"]
    first = stage["configurations"][0]
    if stage["search_best_kept_its_place"]:
        said.append(f"Winner: trial {first['trial']}, the search's best, kept its place")
    else:
        found_best = [c for c in stage["configurations"] if c["search_rank"] == 1]
        where = (
            f"is #{stage['configurations'].index(found_best[0]) + 1} by its mean"
            if found_best
            else "has no confirmation run that completed"
        )
        said.append(
            f"Winner: trial {first['trial']} (the search's #{first['search_rank']}); the "
            f"search's best, trial {found['search_best']['trial']}, {where}"
        )
    return said


def _shown(spread: dict[str, Any]) -> str:
    low, high = spread["ci95"]
    if low is None:
        return f"{spread['mean']:.4f} (1 run)"
    return f"{spread['mean']:.4f} ± {(high - low) / 2:.4f}"


def results(opened: Opened, confirming: Any = None, runs: list | None = None) -> dict[str, Any]:
    """What optimization_results.yaml holds: the counts, and the best trial; with a
    confirmation stage (hydra.sweeper.confirm, `runs`: the trials' MLflow runs), the
    confirmed configurations with their spread, and the winner by its mean as the best
    (its run with the best value of the metric: its model)."""
    trials = opened.study.get_trials(deepcopy=False)
    state = schedule.tally(trials)
    found: dict[str, Any] = {
        "name": "optuna",
        "study_name": opened.name,
        "optimized_metric": opened.metrics if opened.multi else opened.metric,
        "n_trials": opened.n_trials,
        "finished": len(state.counted),
        "complete": sum(t.state == TrialState.COMPLETE for t in state.counted),
        "failed": len(state.failed),
        "cut_off": sum(schedule.cut_off(t) and not schedule.stepped_aside(t) for t in trials),
        "stepped_aside": sum(schedule.stepped_aside(t) for t in trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "parent_run_id": opened.parent,
        "ended": opened.why_ended(),
    }
    maximize = opened.maximize
    if found["complete"] and opened.multi:  # hydra-optuna-sweeper's key, with the trials
        found["solutions"] = [
            {
                "trial": t.number,
                "params": t.params,
                "values": t.values,
                **(
                    {"run_id": t.user_attrs["mlflow_run_id"]}
                    if "mlflow_run_id" in t.user_attrs
                    else {}
                ),
            }
            for t in sorted(opened.study.best_trials, key=lambda t: t.number)
        ]
    elif found["complete"]:
        (best,) = confirm.top(trials, 1, maximize)
        found.update(
            best_trial=best.number,
            best_params=best.params,
            best_value=best.value,
            best_run_id=best.user_attrs.get("mlflow_run_id"),
        )
    if found["complete"] and confirming and confirming.top_k:
        metrics = {r.info.run_id: r.data.metrics for r in runs or []}
        for t in trials:  # a sweep of more runs than trials_of reads
            run_id = t.user_attrs.get("mlflow_run_id")
            if schedule.confirming(t) and run_id and run_id not in metrics:
                metrics[run_id] = sweep_runs.metrics_of(run_id)
        stage = confirm.results(
            trials,
            confirming.top_k,
            confirming.seeds,
            opened.metric,
            maximize,
            metrics,
            opened.app.seed_key(confirming),
        )
        if stage:
            found["confirmation"] = stage
        if stage and stage["configurations"]:
            winner = stage["configurations"][0]
            found["search_best"] = {k[5:]: found[k] for k in list(found) if k.startswith("best_")}
            found.update(
                best_trial=winner["model_trial"],
                best_params=winner["params"],
                best_value=winner[opened.metric]["mean"],
                best_run_id=winner["model_run_id"],
            )
    return found


def confirmed_figure(found: dict[str, Any]) -> Any:
    """Each confirmed configuration's mean and 95% interval of the optimized metric over
    its new seeds, each run's value, and the search's single run (its place in the
    search), best mean first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, stage = found["optimized_metric"], found["confirmation"]
    figure, axes = plt.subplots(figsize=(8, 1.6 + 0.9 * len(stage["configurations"])))
    for row, c in enumerate(stage["configurations"]):
        spread = c[metric]
        low, high = spread["ci95"]
        if low is not None:
            axes.errorbar(
                spread["mean"],
                row,
                xerr=[[spread["mean"] - low], [high - spread["mean"]]],
                fmt="o",
                color="C0",
                capsize=4,
                label="mean, 95% interval" if row == 0 else None,
            )
        else:
            axes.plot(spread["mean"], row, "o", color="C0")
        axes.plot(
            c.get("values", []),
            [row] * len(c.get("values", [])),
            "|",
            color="C0",
            alpha=0.6,
            markersize=12,
            label="each new seed" if row == 0 else None,
        )
        axes.plot(
            c["search_value"],
            row,
            "x",
            color="C3",
            markersize=9,
            label="the search's run" if row == 0 else None,
        )
    axes.set_yticks(
        range(len(stage["configurations"])),
        [
            f"#{place} {c['label']}\n(the search's #{c['search_rank']})"
            for place, c in enumerate(stage["configurations"], 1)
        ],
    )
    axes.invert_yaxis()
    axes.set_xlabel(f"{metric} over {stage['seeds']} new seeds each")
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    return figure


def search_view(study: optuna.Study) -> optuna.Study:
    """The study's search trials alone, for Optuna's plots: without the confirmation
    stage's repeats of the best configurations (confirm.py), which would weigh them
    again and draw their luckiest seed as the best value."""
    trials = study.get_trials(deepcopy=False)
    if not any(schedule.confirming(t) for t in trials):
        return study
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created"
    try:
        view = optuna.create_study(directions=study.directions)
    finally:
        optuna.logging.set_verbosity(verbosity)
    view.add_trials([t for t in trials if not schedule.confirming(t)])
    if study.metric_names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            view.set_metric_names(study.metric_names)
    return view


def pair(names: list[str]) -> list[str]:
    """The two parameters a contour plot shows: lr x batch size where searched."""
    chosen = [n for n in ("optimizer.lr", "data.batch_size") if n in names] or names[:2]
    return chosen if len(chosen) == 2 else names[:2]


@dataclass(frozen=True)
class Drawable:
    """What a study's plots can show, read once for the static and interactive ones."""

    names: list[str]  # the parameters of its complete trials
    importances: Any  # fANOVA's (importances.py), where 2 complete trials have parameters
    pruned: bool  # a trial reported values epoch by epoch (a pruner)

    @classmethod
    def of(cls, handle: optuna.Study) -> Drawable:
        trials = handle.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        names = sorted({p for t in complete for p in t.params})
        importances = None
        if len(complete) >= 2 and names:
            from fashion_sweep.sweeps.importances import Importances

            importances = Importances()
        return cls(names, importances, any(t.intermediate_values for t in trials))


def plots(handle: optuna.Study, metrics: list[str], what: Drawable) -> dict[str, Any]:
    """Optimisation history, parameter importances, lr x batch size (static images, for
    the parent run's description), or a multi-objective study's Pareto front; what can
    be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as vis

    metric = metrics[0]
    wanted: dict[str, Any] = {
        "pareto_front.png": lambda: vis.plot_pareto_front(handle, target_names=metrics)
    }
    if len(metrics) > 1:
        return _figures(wanted)
    wanted = {
        "optimization_history.png": lambda: vis.plot_optimization_history(
            handle, target_name=metric
        )
    }
    if what.pruned:
        wanted["intermediate_values.png"] = lambda: vis.plot_intermediate_values(handle)
    if what.importances is not None:
        wanted["param_importances.png"] = lambda: vis.plot_param_importances(
            handle, evaluator=what.importances, target_name=metric
        )
    if len(what.names) >= 2:
        shown = pair(what.names)
        wanted[f"{'_x_'.join(_slug(n) for n in shown)}.png"] = lambda: vis.plot_contour(
            handle, params=shown, target_name=metric
        )
    return _figures(wanted)


def _figures(wanted: dict[str, Any]) -> dict[str, Any]:
    figures = {}
    for name, axes in drawn(wanted).items():
        axes = axes.flat[0] if hasattr(axes, "flat") else axes
        figure = axes.get_figure()
        figure.set_size_inches(8, 5.5)
        figure.tight_layout()
        figures[name] = figure
    return figures


def page(opened: Opened, what: Drawable, handle: optuna.Study) -> str:
    """Optuna's interactive plots of the study (`handle`: its search_view) on one HTML
    page (plotly.js inline once, so it opens offline, and inside MLflow's artifact
    viewer)."""
    from optuna import visualization as vis

    metric = opened.metric
    wanted: dict[str, Any] = {}
    if opened.multi:
        wanted["Pareto front"] = lambda: vis.plot_pareto_front(handle, target_names=opened.metrics)
    else:
        wanted.update(_single(handle, metric, what))
    wanted["Timeline"] = lambda: vis.plot_timeline(handle)
    parts = []
    # the static plots said what cannot be drawn
    for number, (title, figure) in enumerate(drawn(wanted, say=False).items()):
        inline = "inline" if number == 0 else False
        body = figure.to_html(full_html=False, include_plotlyjs=inline)
        parts.append(f"<h2>{html.escape(title)}</h2>\n{body}")
    title = html.escape(f"Sweep {opened.name}: {', '.join(opened.metrics)}")
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title></head>'
        f'<body style="font-family: sans-serif"><h1>{title}</h1>\n'
        + "\n".join(parts)
        + "</body></html>\n"
    )


def _single(handle: optuna.Study, metric: str, what: Drawable) -> dict[str, Any]:
    """The interactive plots of a single-objective study."""
    from optuna import visualization as vis

    wanted: dict[str, Any] = {
        "Optimization history": lambda: vis.plot_optimization_history(handle, target_name=metric),
        "Slice (each parameter against the metric)": lambda: vis.plot_slice(
            handle, target_name=metric
        ),
        "Parallel coordinates": lambda: vis.plot_parallel_coordinate(handle, target_name=metric),
    }
    if len(what.names) >= 2:
        shown = pair(what.names)
        wanted["Contour"] = lambda: vis.plot_contour(handle, params=shown, target_name=metric)
    if what.importances is not None:
        wanted["Parameter importances (fANOVA)"] = lambda: vis.plot_param_importances(
            handle, evaluator=what.importances, target_name=metric
        )
    if what.pruned:
        wanted["Intermediate values (pruning)"] = lambda: vis.plot_intermediate_values(handle)
    return wanted


def front(found: dict[str, Any]) -> list[str]:
    """The console's lines on a multi-objective study: its Pareto front."""
    if "solutions" not in found:
        return ["No trial completed: there is no Pareto front"]
    from fashion_sweep.sweeps.progress import label

    metrics = found["optimized_metric"]
    n = len(found["solutions"])
    said = [f"Pareto front ({n} trial{'s' if n > 1 else ''}: none is better in every metric):"]
    for s in found["solutions"]:
        values = ", ".join(f"{m} {v:.4g}" for m, v in zip(metrics, s["values"], strict=True))
        said.append(f"  {label(s['trial'], s['params'])}: {values}")
    return said


def save_plots(folder: Path, figures: dict[str, Any], pages: dict[str, str]) -> None:
    """The plots in the sweep folder, for an app without MLflow runs."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, figure in figures.items():
        figure.savefig(folder / name, dpi=100)
    for name, text in pages.items():
        (folder / name).write_text(text)


def drawn(wanted: dict[str, Any], say: bool = True) -> dict[str, Any]:
    """Each plot drawn, or skipped (with a warning if `say`): a plot must not fail the
    sweep."""
    figures = {}
    for name, draw in wanted.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                figures[name] = draw()
        except Exception as error:
            if say:
                log.warning(f"plot {name} skipped: {error}")
    return figures


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name.rsplit(".", 1)[-1])
