"""`python -m fashion_sweep.bench`: the tutorial's input path against the fast paths.

Runs each path in this process on the same data and seed, and prints per path the
seconds per training epoch (median), samples per second, the speed-up over the
tutorial path and the test accuracy, as a table and as JSON. Needs torch and
torchvision only (no Hydra, no MLflow), so it runs on a bare GPU machine.

`--sweep-overhead` also times a real small sweep (subprocesses of the train command)
and reports what each trial costs beyond its training loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

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
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with redirect_stdout(StringIO()):  # the progress lines are not the benchmark
            train_one_epoch(loaders["train"], step, device)
        seconds.append(time.perf_counter() - start)  # train_one_epoch ends on a sync
    result = evaluate(loaders["test"], model, loss_fn, device)
    epoch = statistics.median(seconds)
    return {
        "path": name,
        "seconds_per_epoch": epoch,
        "samples_per_second": len(loaders["train"].dataset) / epoch,
        "test_accuracy": result["accuracy"],
        "test_loss": result["loss"],
        "train_seconds_total": sum(seconds),
    }


def sweep_overhead(data_root: str, trials: int, train_size: int) -> dict[str, float]:
    """What one more trial of a real sweep costs beyond its epoch loop (train + eval).

    Times sweeps of 2 and 2 + `trials` trials (1 epoch on `train_size` images each) and
    takes the difference, so start-up, imports and the sweep's plots cancel out (the
    2-trial sweep runs before and after, and the faster counts, so a cold disk cache
    does not); what is left per trial beyond the loop is Hydra's job set-up, MLflow
    logging and model.pth.
    """
    with tempfile.TemporaryDirectory() as tmp:
        base = [sys.executable, "-m", "fashion_sweep.train", "-m", "sweep=optuna"]
        base += [f"data.root={os.path.abspath(data_root)}", f"data.train_size={train_size}"]
        base += ["trainer.epochs=1", "hydra.sweeper.study_name=bench"]
        walls, loops = {}, {}
        for i, n in enumerate((2, 2 + trials, 2)):
            cwd = Path(tmp) / str(i)
            cwd.mkdir()
            start = time.perf_counter()
            subprocess.run(
                [*base, f"hydra.sweeper.n_trials={n}"], cwd=cwd, check=True, capture_output=True
            )
            walls[n] = min(walls.get(n, float("inf")), time.perf_counter() - start)
            with sqlite3.connect(cwd / "mlflow.db") as db:
                (loops[n],) = db.execute(
                    "select sum(value) from metrics where key in"
                    " ('perf/epoch_seconds', 'perf/eval_seconds')"
                ).fetchone()
    per_trial = (walls[2 + trials] - walls[2]) / trials
    in_loop = (loops[2 + trials] - loops[2]) / trials
    return {
        "trials": trials,
        "train_size": train_size,
        "seconds_per_trial": per_trial,
        "loop_seconds_per_trial": in_loop,
        "overhead_seconds_per_trial": per_trial - in_loop,
        "overhead_fraction": (per_trial - in_loop) / per_trial,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per path")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=None, help="first N images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--sweep-overhead", type=int, default=0, metavar="TRIALS")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    prepare_raw(args.data_root)
    splits = load_splits(args.data_root, train_size=args.train_size)
    paths = ["tutorial", "resident"] + (["resident+cuda_graph"] if device.type == "cuda" else [])
    rows = [run_path(p, splits, device, args.epochs, args.batch_size, args.seed) for p in paths]
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
    print(f"{'path':<22}{'s/epoch':>10}{'samples/s':>12}{'speed-up':>10}{'test acc':>10}")
    for row in rows:
        print(
            f"{row['path']:<22}{row['seconds_per_epoch']:>10.3f}"
            f"{row['samples_per_second']:>12.0f}{row['speedup']:>9.2f}x"
            f"{100 * row['test_accuracy']:>9.2f}%"
        )
    if args.sweep_overhead:
        report["sweep"] = sweep_overhead(args.data_root, args.sweep_overhead, 10_000)
        s = report["sweep"]
        print(
            f"\nsweep of {s['trials']} trials, 1 epoch on {s['train_size']} images each: "
            f"{s['seconds_per_trial']:.2f} s/trial, {s['loop_seconds_per_trial']:.2f} s in the "
            f"loop (train + eval), overhead {s['overhead_seconds_per_trial']:.2f} s "
            f"({100 * s['overhead_fraction']:.0f}%)"
        )
    print("\n" + json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
