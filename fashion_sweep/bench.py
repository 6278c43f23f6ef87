"""`python -m fashion_sweep.bench`: the tutorial's input path against the fast paths.

Runs each path in this process on the same data and seed, and prints per path the
seconds per training epoch (median), samples per second, the speed-up over the
tutorial path, the test accuracy, and the seconds one evaluation of the test split
takes (and as a fraction of an epoch), as a table and as JSON. Needs torch and
torchvision only (no Hydra, no MLflow), so it runs on a bare GPU machine.

`--sweep-overhead N` also runs a real sweep of N + 2 trials (a subprocess of the train
command) and reports what a trial costs beyond its training loop. `--pruning N` runs
the preset's seeded sweep of N trials twice, without a pruner and with the recommended
one (README, Pruning), and reports the epochs trained, the wall time and the best
val/accuracy of each. `--packed N` trains N trials (learning rates 1e-3 .. 1e-1) one
after another and then packed into one program (fashion_sweep/packed.py), and reports
trials per minute each way (eagerly; on CUDA with CUDA-graph-captured steps too).
`--fixed-cost N` times a single run's command N times against the bare
`import torch, torchvision`, and splits its wall time into training, evaluation and the
fixed cost (start-up, MLflow, the model file).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from datetime import datetime
from io import StringIO
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fashion_sweep.data import load_splits, make_loaders, prepare_raw
from fashion_sweep.engine import TrainStep, evaluate, train_one_epoch
from fashion_sweep.model import NeuralNetwork


def run_path(
    name: str, splits: dict, device: torch.device, epochs: int, batch_size: int, seed: int
) -> dict[str, float | str]:
    """Trains the tutorial's model for `epochs` epochs on one path; times each epoch."""
    loader = "torch" if name == "tutorial" else "resident"
    loaders = make_loaders(splits, loader, batch_size, device, seed=seed)
    torch.manual_seed(seed)
    model = NeuralNetwork().to(device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    step = TrainStep(model, loss_fn, optimizer, cuda_graph=name == "resident+cuda_graph")
    seconds = []
    for _ in range(epochs):
        _sync(device)
        start = time.perf_counter()
        with redirect_stdout(StringIO()):  # the progress lines are not the benchmark
            train_one_epoch(loaders["train"], step, device)
        seconds.append(time.perf_counter() - start)  # train_one_epoch ends on a sync
    start = time.perf_counter()
    result = evaluate(loaders["test"], model, loss_fn, device)  # ends on a sync (.item())
    eval_seconds = time.perf_counter() - start
    epoch = statistics.median(seconds)
    return {
        "path": name,
        "seconds_per_epoch": epoch,
        "samples_per_second": len(loaders["train"].dataset) / epoch,
        "test_accuracy": result["accuracy"],
        "test_loss": result["loss"],
        "train_seconds_total": sum(seconds),
        "eval_seconds": eval_seconds,
        "eval_fraction": eval_seconds / epoch,
    }


def packed_vs_alone(
    splits: dict, device: torch.device, trials: int, epochs: int, batch_size: int, seed: int
) -> list[dict]:
    """`trials` trials of the tutorial's recipe, learning rates spread log-evenly over
    1e-3 .. 1e-1: trained one after another, then all at once as one pack
    (fashion_sweep/packed.py), each way `epochs` epochs and one evaluation of the test
    split per trial, in this process; eagerly, and on CUDA with the step captured in a
    CUDA graph too (trainer.cuda_graph=true: one graph per trial, one for the pack)."""
    from fashion_sweep import packed

    lrs = [1e-3 * 100 ** (i / max(1, trials - 1)) for i in range(trials)]
    loss_fn = nn.CrossEntropyLoss()

    def model() -> NeuralNetwork:
        torch.manual_seed(seed)
        return NeuralNetwork().to(device)

    def train() -> Any:  # a fresh loader: every trial sees the same order
        return make_loaders(splits, "resident", batch_size, device, seed=seed)["train"]

    test = make_loaders(splits, "resident", batch_size, device, seed=seed)["test"]
    rows = []
    for graph in [False] + ([True] if device.type == "cuda" else []):
        # a warm-up of each way, not timed: the first optimizer's import (torch._dynamo),
        # the device's libraries
        net = model()
        TrainStep(net, loss_fn, torch.optim.SGD(net.parameters(), lr=1e-3))(*next(iter(train())))
        packed.Pack([model(), model()], torch.optim.SGD, [{"lr": 1e-3}] * 2).step(
            *next(iter(train()))
        )
        _sync(device)
        start = time.perf_counter()
        alone = []
        for lr in lrs:
            net = model()
            step = TrainStep(net, loss_fn, torch.optim.SGD(net.parameters(), lr=lr), graph)
            with redirect_stdout(StringIO()):
                for _ in range(epochs):
                    train_one_epoch(train(), step, device)
            alone.append(evaluate(test, net, loss_fn, device))
        alone_seconds = time.perf_counter() - start
        start = time.perf_counter()
        pack = packed.Pack(
            [model() for _ in lrs], torch.optim.SGD, [{"lr": lr} for lr in lrs], cuda_graph=graph
        )
        for _ in range(epochs):
            packed.train_epoch([train()], pack)
        together = packed.evaluate(test, pack)
        _sync(device)
        packed_seconds = time.perf_counter() - start
        rows.append(
            {
                "step": "cuda_graph" if graph else "eager",
                "trials": trials,
                "epochs": epochs,
                "alone_seconds": alone_seconds,
                "packed_seconds": packed_seconds,
                "alone_trials_per_minute": 60 * trials / alone_seconds,
                "packed_trials_per_minute": 60 * trials / packed_seconds,
                "ratio": alone_seconds / packed_seconds,
                "best_test_accuracy": {
                    "alone": max(r["accuracy"] for r in alone),
                    "packed": max(r["accuracy"] for r in together),
                },
                "max_test_loss_rel_diff": max(
                    abs(a["loss"] - b["loss"]) / abs(a["loss"])
                    for a, b in zip(alone, together, strict=True)
                ),
            }
        )
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


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


def fixed_cost(data_root: str, times: int, overrides: list[str] | None = None) -> dict:
    """What a single run costs beyond its epochs: `times` alternations of the bare
    `python -c "import torch, torchvision"` and the train command (after one run that
    creates the store), each command's wall time less the training and evaluation
    seconds its MLflow run logged. Medians."""
    from mlflow.tracking import MlflowClient

    overrides = TINY_RUN if overrides is None else overrides
    rows: dict[str, list[float]] = {"import": [], "wall": [], "train": [], "eval": []}
    with tempfile.TemporaryDirectory() as tmp:
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


# The pruner the README recommends, as the overrides that select it (README, Pruning).
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


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=_at_least(1), default=3, help="timed epochs per path")
    parser.add_argument("--batch-size", type=_at_least(1), default=64)
    parser.add_argument("--train-size", type=_at_least(1), default=None, help="first N images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--sweep-overhead", type=_at_least(0), default=0, metavar="TRIALS")
    parser.add_argument(
        "--sweep-epochs", type=_at_least(1), default=1, help="epochs per sweep trial"
    )
    parser.add_argument(
        "--pruning",
        type=_at_least(0),
        default=0,
        metavar="TRIALS",
        help="also run a seeded sweep of TRIALS trials without and with the recommended pruner",
    )
    parser.add_argument("--pruning-epochs", type=_at_least(1), default=5)
    parser.add_argument("--pruning-train-size", type=_at_least(1), default=10_000)
    parser.add_argument(
        "--pruner", nargs="*", default=None, help="overrides that select the pruner to compare"
    )
    parser.add_argument(
        "--packed",
        type=_at_least(1),
        nargs="?",
        const=64,
        default=0,
        metavar="TRIALS",
        help="also train TRIALS trials (64 if no number) one after another and packed",
    )
    parser.add_argument(
        "--fixed-cost",
        type=_at_least(0),
        default=0,
        metavar="TIMES",
        help="also time a single run's command against the bare torch import, TIMES times",
    )
    parser.add_argument(
        "--fixed-cost-run",
        nargs="*",
        default=None,
        metavar="OVERRIDE",
        help=f"the run that --fixed-cost times (default: {' '.join(TINY_RUN)})",
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    prepare_raw(args.data_root)
    paths = ["tutorial", "resident"] + (["resident+cuda_graph"] if device.type == "cuda" else [])
    rows = []
    splits = load_splits(args.data_root, train_size=args.train_size)
    for path in paths:  # the tutorial's path reads the data with torchvision, as it does
        data = splits
        if path == "tutorial":
            data = load_splits(args.data_root, train_size=args.train_size, reader="torchvision")
        rows.append(run_path(path, data, device, args.epochs, args.batch_size, args.seed))
    for row in rows:
        row["speedup"] = row["samples_per_second"] / rows[0]["samples_per_second"]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "epochs": args.epochs,
        "train_images": len(splits["train"]),
        "paths": rows,
    }
    print(f"{report['device']}, torch {report['torch']}, {report['train_images']} images, ")
    print(f"median of {args.epochs} epochs, batch {args.batch_size}\n")
    print(
        f"{'path':<22}{'s/epoch':>10}{'samples/s':>12}{'speed-up':>10}{'test acc':>10}"
        f"{'eval s':>9}{'eval/epoch':>12}"
    )
    for row in rows:
        print(
            f"{row['path']:<22}{row['seconds_per_epoch']:>10.3f}"
            f"{row['samples_per_second']:>12.0f}{row['speedup']:>9.2f}x"
            f"{100 * row['test_accuracy']:>9.2f}%{row['eval_seconds']:>9.3f}"
            f"{100 * row['eval_fraction']:>11.1f}%"
        )
    if args.sweep_overhead:
        report["sweep"] = sweep_overhead(
            args.data_root, args.sweep_overhead, 10_000, args.sweep_epochs
        )
        s = report["sweep"]
        print(
            f"\nsweep of {s['trials']} trials, {s['epochs']} epoch(s) on {s['train_size']} "
            "images each: "
            f"{s['seconds_per_trial']:.2f} s/trial, {s['loop_seconds_per_trial']:.2f} s in the "
            f"loop (train + eval), overhead {s['overhead_seconds_per_trial']:.3f} s "
            f"({100 * s['overhead_fraction']:.1f}%; median {s['overhead_seconds_median']:.3f} s)"
        )
    if args.pruning:
        report["pruning"] = pruning(
            args.data_root, args.pruning, args.pruning_train_size, args.pruning_epochs, args.pruner
        )
        print(
            f"\nsweep of {args.pruning} trials, {args.pruning_epochs} epochs on "
            f"{args.pruning_train_size} images each, without and with a pruner:"
        )
        print(f"{'pruner':<10}{'epochs':>8}{'pruned':>8}{'wall s':>9}{'best val acc':>14}")
        for row in report["pruning"]:
            print(
                f"{row['pruner']:<10}{row['epochs_trained']:>8}{row['pruned']:>8}"
                f"{row['wall_seconds']:>9.1f}{row['best_val_accuracy']:>14.4f}"
            )
    if args.packed:
        report["packed"] = packed_vs_alone(
            splits, device, args.packed, args.epochs, args.batch_size, args.seed
        )
        print(
            f"\n{args.packed} trials of {args.epochs} epoch(s), SGD at learning rates "
            "1e-3 .. 1e-1, one after another and packed:"
        )
        print(
            f"{'step':<12}{'alone s':>9}{'trials/min':>12}{'packed s':>10}{'trials/min':>12}"
            f"{'ratio':>8}{'best acc alone/packed':>24}{'test loss rel diff':>20}"
        )
        for p in report["packed"]:
            best = p["best_test_accuracy"]
            print(
                f"{p['step']:<12}{p['alone_seconds']:>9.2f}{p['alone_trials_per_minute']:>12.1f}"
                f"{p['packed_seconds']:>10.2f}{p['packed_trials_per_minute']:>12.1f}"
                f"{p['ratio']:>7.2f}x{best['alone']:>15.4f} / {best['packed']:.4f}"
                f"{p['max_test_loss_rel_diff']:>20.1e}"
            )
    if args.fixed_cost:
        report["fixed_cost"] = f = fixed_cost(args.data_root, args.fixed_cost, args.fixed_cost_run)
        print(
            f"\na single run ({' '.join(f['overrides'])}), median of {f['times']}: "
            f"{f['wall_seconds']:.2f} s wall = {f['train_seconds']:.2f} s training + "
            f"{f['eval_seconds']:.2f} s evaluation + {f['fixed_seconds']:.2f} s fixed cost; "
            f"`{BARE_IMPORT}` {f['import_seconds']:.2f} s, the run "
            f"{f['over_import_seconds']:+.2f} s beside it (at most {f['over_import_max']:+.2f} s)"
        )
    print("\n" + json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
