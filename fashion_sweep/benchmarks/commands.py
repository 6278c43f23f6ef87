"""Whole commands timed in subprocesses, their stores read afterwards: what a sweep's
trial costs beyond its loop, what a single run costs beyond its epochs, and a sweep
without and with a pruner. They need the package installed (Hydra, MLflow, Optuna)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path


def sweep_overhead(
    data_root: str, trials: int, train_size: int, epochs: int = 1
) -> dict[str, float]:
    """What a trial of a real sweep costs beyond its epoch loop (train + eval).

    Runs one sweep (a subprocess of the train command) of `trials + 2` trials, `epochs`
    epochs on `train_size` images each, and reads its stores: a trial's cost is the time from
    its start to the next trial's start (Optuna's datetime_start), its loop the epoch
    and eval seconds it logged to MLflow. The first trial (imports, decoding the data)
    and the last (the sweep's plots follow it) are left out. What is left beyond the
    loop is Hydra's job set-up, the MLflow run and model.pth, and Optuna's bookkeeping.
    """
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "fashion_sweep.train", "-m", "sweep=optuna"]
        command += [f"data.root={os.path.abspath(data_root)}", f"data.train_size={train_size}"]
        command += [f"trainer.epochs={epochs}", f"hydra.sweeper.n_trials={trials + 2}"]
        subprocess.run(command, cwd=tmp, check=True, capture_output=True)
        starts, loops = _trial_timings(tmp)
    measured = range(1, len(starts) - 1)
    costs = [(starts[n + 1] - starts[n]).total_seconds() for n in measured]
    overheads = [cost - loops[n] for cost, n in zip(costs, measured, strict=True)]
    per_trial, in_loop = statistics.mean(costs), statistics.mean(loops[n] for n in measured)
    return {
        "trials": len(costs),
        "train_size": train_size,
        "epochs": epochs,
        "seconds_per_trial": per_trial,
        "loop_seconds_per_trial": in_loop,
        "overhead_seconds_per_trial": per_trial - in_loop,
        "overhead_seconds_median": statistics.median(overheads),
        "overhead_fraction": (per_trial - in_loop) / per_trial,
    }


# A run whose epochs take next to nothing: its wall time is the fixed cost of a run.
TINY_RUN = ["data.train_size=64", "data.test_size=64", "trainer.epochs=1"]
BARE_IMPORT = "import torch, torchvision"


def fixed_cost(
    data_root: str, times: int, overrides: list[str] | None = None, folder: str | None = None
) -> dict:
    """What a single run costs beyond its epochs: `times` alternations of the bare
    `python -c "import torch, torchvision"` and the train command (after one run that
    creates the store), each command's wall time less the training and evaluation
    seconds its MLflow run logged. Medians. The runs' store is kept in `folder`, if
    given (else a temporary one)."""
    from mlflow.tracking import MlflowClient

    overrides = TINY_RUN if overrides is None else overrides
    rows: dict[str, list[float]] = {"import": [], "wall": [], "train": [], "eval": []}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = folder or scratch
        command = [sys.executable, "-m", "fashion_sweep.train"]
        command += [f"data.root={os.path.abspath(data_root)}", *overrides]
        subprocess.run(command, cwd=tmp, check=True, capture_output=True)  # makes mlflow.db
        for _ in range(times):
            rows["import"].append(_wall([sys.executable, "-c", BARE_IMPORT], tmp))
            rows["wall"].append(_wall(command, tmp))
        client = MlflowClient(f"sqlite:///{Path(tmp, 'mlflow.db')}")
        experiment = client.get_experiment_by_name("fashion_sweep")
        runs = client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])
        for run in runs[1:]:
            for key, metric in (("train", "perf/epoch_seconds"), ("eval", "perf/eval_seconds")):
                history = client.get_metric_history(run.info.run_id, metric)
                rows[key].append(sum(m.value for m in history))
    fixed = [w - t - e for w, t, e in zip(rows["wall"], rows["train"], rows["eval"], strict=True)]
    over = [w - i for w, i in zip(rows["wall"], rows["import"], strict=True)]
    median = statistics.median
    return {
        "times": times,
        "overrides": overrides,
        "import_seconds": median(rows["import"]),
        "wall_seconds": median(rows["wall"]),
        "train_seconds": median(rows["train"]),
        "eval_seconds": median(rows["eval"]),
        "fixed_seconds": median(fixed),
        "over_import_seconds": median(over),
        "over_import_max": max(over),
    }


def _wall(command: list[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


# The pruner docs/sweeps.md recommends, as the overrides that select it.
RECOMMENDED_PRUNER = ["hydra/sweeper/pruner=hyperband"]


def pruning(
    data_root: str,
    trials: int,
    train_size: int,
    epochs: int,
    pruner: list[str] | None = None,
) -> list[dict]:
    """The same seeded sweep (the preset's space and sampler seed) without a pruner and
    with `pruner`, one after the other: wall time, epochs trained (counted from the
    trials' MLflow runs) and the best val/accuracy of each."""
    rows = []
    for name, extra in (("none", []), ("pruned", pruner or RECOMMENDED_PRUNER)):
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "fashion_sweep.train", "-m", "sweep=optuna"]
            command += [f"data.root={os.path.abspath(data_root)}"]
            command += [f"data.train_size={train_size}", f"trainer.epochs={epochs}"]
            command += [f"hydra.sweeper.n_trials={trials}", *extra]
            start = time.perf_counter()
            subprocess.run(command, cwd=tmp, check=True, capture_output=True)
            wall = time.perf_counter() - start
            rows.append({"pruner": name, "overrides": extra, "wall_seconds": wall, **_epochs(tmp)})
    return rows


def _epochs(cwd: str) -> dict:
    """Epochs trained over a sweep's trials, how many were pruned, its best value."""
    import optuna
    from mlflow.tracking import MlflowClient

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{Path(cwd, 'optuna.db')}")
    client = MlflowClient(f"sqlite:///{Path(cwd, 'mlflow.db')}")
    experiment = client.get_experiment_by_name("fashion_sweep")
    runs = client.search_runs([experiment.experiment_id], "tags.trial != ''", max_results=1000)
    return {
        "trials": len(runs),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
        "epochs_trained": sum(
            len(client.get_metric_history(run.info.run_id, "train/loss")) for run in runs
        ),
        "best_val_accuracy": study.best_value,
    }


def _trial_timings(cwd: str) -> tuple[list[datetime], dict[int, float]]:
    """Each trial's start (from the study), and its loop's seconds (from its MLflow run)."""
    import optuna
    from mlflow.tracking import MlflowClient

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{Path(cwd, 'optuna.db')}")
    starts = [t.datetime_start for t in study.trials]
    client = MlflowClient(f"sqlite:///{Path(cwd, 'mlflow.db')}")
    experiment = client.get_experiment_by_name("fashion_sweep")
    loops = {
        int(run.data.tags["trial"]): sum(
            m.value
            for key in ("perf/epoch_seconds", "perf/eval_seconds")
            for m in client.get_metric_history(run.info.run_id, key)
        )
        for run in client.search_runs([experiment.experiment_id], "tags.trial != ''")
    }
    return starts, loops
