"""Where a sweep's time goes (`bench --sweep`): the same sweep run under each launcher,
in alternation, each run a subprocess of the train command in a folder of its own, its
stores read afterwards.

Per run: the wall time of the command; the seconds its trials trained and evaluated
(the perf/epoch_seconds and perf/eval_seconds each trial's MLflow run logged; a pack's
members log its epochs' seconds divided among them); the busy fraction of the slots
(those seconds over wall time x slots, where the slots are what trains at once: the
sweep's own process under basic and packed, the launcher's processes under joblib and
submitit) and the harness's share (1 - busy); how full the slots were kept from the first
trial's start to the last one's end (their runs' overlap: what the sweeper between trials
and a batch waiting for its slowest trial cost); trials per minute. Each run's timeline
(one bar per trial, Optuna's) goes into the sweep's parent run as plots/timeline.png.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

POOLS = ("joblib", "submitit_local")  # launchers whose trials train in processes of their own


def sweeps(
    data_root: str,
    overrides: list[str],
    launchers: list[str],
    rounds: int,
    folder: str | None = None,
) -> dict[str, Any]:
    """`rounds` alternations of the sweep `overrides` under each of `launchers`; every
    run's figures, and each launcher's medians. Each run's folder is kept under
    `folder` (`<launcher>-<round>`), if given."""
    runs: dict[str, list[dict]] = {name: [] for name in launchers}
    for round_ in range(rounds):
        for name in launchers:
            with tempfile.TemporaryDirectory() as scratch:
                label = name.replace(" ", "_").replace("/", "_")
                cwd = Path(folder, f"{label}-{round_}") if folder else Path(scratch)
                cwd.mkdir(parents=True, exist_ok=True)
                runs[name].append(one(data_root, overrides, name, str(cwd)))
    medians = {
        name: {key: statistics.median(r[key] for r in rows) for key in rows[0] if key != "slots"}
        for name, rows in runs.items()
    }
    return {"overrides": overrides, "rounds": rounds, "runs": runs, "medians": medians}


def one(data_root: str, overrides: list[str], launcher: str, cwd: str) -> dict[str, float]:
    """One sweep under `launcher`: a launcher's name, and overrides of its own after it
    (`"packed hydra.launcher.mix_batch_sizes=true"`)."""
    launcher, *own = launcher.split()
    command = [sys.executable, "-m", "fashion_sweep.train", "-m", "sweep=optuna"]
    command += [f"hydra/launcher={launcher}", f"data.root={os.path.abspath(data_root)}"]
    command += [*overrides, *own, "hydra.sweeper.study_name=bench"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the {launcher} sweep failed: {done.stderr.strip()[-2000:]}")
    return figures(cwd, wall, launcher in POOLS)


def _edges(runs: list[Any]) -> list[tuple[int, int]]:
    """Each run's start (+1) and end (-1), in ms, in order; ends before starts at a tie.
    A run, not Optuna's trial: a trial starts when it is asked, before it is launched."""
    edges = []
    for run in runs:
        if run.info.start_time and run.info.end_time:
            edges += [(run.info.start_time, 1), (run.info.end_time, -1)]
    return sorted(edges)


def concurrency(runs: list[Any]) -> int:
    """The most trials that trained at once: their MLflow runs' overlap."""
    running = most = 0
    for _, step in _edges(runs):
        running += step
        most = max(most, running)
    return max(most, 1)


def filled(runs: list[Any], slots: int) -> float:
    """The share of the slots' time, from the first trial's start to the last one's end,
    during which a slot held a trial (a pack's members overlap in one slot): what the
    slots lose to the sweeper between trials and to batches waiting for their slowest."""
    edges = _edges(runs)
    if not edges or edges[-1][0] == edges[0][0]:
        return 0.0
    held = 0.0
    running, at = 0, edges[0][0]
    for when, step in edges:
        held += min(running, slots) * (when - at)
        running, at = running + step, when
    return held / (slots * (edges[-1][0] - edges[0][0]))


def figures(cwd: str, wall: float, pooled: bool) -> dict[str, float]:
    """A finished sweep's figures from its stores; its timeline logged to its parent.
    Its slots: the sweep's process (basic, packed), or as many of a pool's processes as
    ran trials at once (`pooled`)."""
    import optuna
    from mlflow.tracking import MlflowClient

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{Path(cwd, 'optuna.db')}")
    client = MlflowClient(f"sqlite:///{Path(cwd, 'mlflow.db')}")
    experiment = client.get_experiment_by_name("fashion_sweep")
    found = client.search_runs([experiment.experiment_id], max_results=10_000)
    trials = [r for r in found if r.data.tags.get("fashion_sweep.kind") == "train"]
    busy = 0.0
    for run in trials:  # a pack's members log its epochs' seconds divided among them
        for key in ("perf/epoch_seconds", "perf/eval_seconds"):
            busy += sum(m.value for m in client.get_metric_history(run.info.run_id, key))
    (parent,) = [r for r in found if r.data.tags.get("fashion_sweep.kind") == "sweep"]
    timeline(study, client, parent.info.run_id)
    counted = len(trials)  # runs: not the trials that stepped aside before they ran
    slots = concurrency(trials) if pooled else 1
    return {
        "wall_seconds": wall,
        "train_eval_seconds": busy,
        "trials": counted,
        "trials_per_minute": 60 * counted / wall,
        "slots": slots,
        "busy_fraction": busy / (wall * slots),
        "harness_share": 1 - busy / (wall * slots),
        "slots_filled": filled(trials, slots),
    }


def timeline(study: Any, client: Any, run_id: str) -> None:
    """Optuna's timeline of the study (a bar per trial) as plots/timeline.png."""
    import matplotlib
    import optuna

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_timeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = plot_timeline(study)
    figure = axes.get_figure()
    figure.set_size_inches(10, max(3, 0.2 * len(study.trials)))
    figure.tight_layout()
    try:
        client.log_figure(run_id, figure, "plots/timeline.png")
    finally:
        plt.close(figure)
