"""Training paths timed in this process, with torch alone (no Hydra, no MLflow), so they
run on a bare GPU machine: the tutorial's input path against the resident loader (and
its CUDA-graph step), and trials one after another against the same trials packed."""

from __future__ import annotations

import statistics
import time
from contextlib import redirect_stdout
from io import StringIO
from typing import Any

import torch
from torch import nn

from fashion_sweep.core import stacked
from fashion_sweep.core.data import make_loaders
from fashion_sweep.core.engine import TrainStep, evaluate, train_one_epoch
from fashion_sweep.core.model import NeuralNetwork


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
    (core/stacked.py), each way `epochs` epochs and one evaluation of the test split per
    trial, in this process; eagerly, and on CUDA with the step captured in a CUDA graph
    too (trainer.cuda_graph=true: one graph per trial, one for the pack)."""
    lrs = [1e-3 * 100 ** (i / max(1, trials - 1)) for i in range(trials)]
    trial = _Trials(splits, device, batch_size, seed)
    rows = []
    for graph in [False] + ([True] if device.type == "cuda" else []):
        trial.warm_up()
        start = time.perf_counter()
        alone = [trial.alone(lr, epochs, graph) for lr in lrs]
        alone_seconds = time.perf_counter() - start
        start = time.perf_counter()
        together = trial.packed(lrs, epochs, graph)
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


class _Trials:
    """The trials packed_vs_alone times: each seeded alike, each with a fresh loader (so
    every trial sees the same order), evaluated on the test split."""

    def __init__(self, splits: dict, device: torch.device, batch_size: int, seed: int):
        self.splits, self.device, self.batch_size, self.seed = splits, device, batch_size, seed
        self.loss_fn = nn.CrossEntropyLoss()
        self.test = self._loaders()["test"]

    def _loaders(self) -> dict[str, Any]:
        return make_loaders(self.splits, "resident", self.batch_size, self.device, seed=self.seed)

    def _model(self) -> NeuralNetwork:
        torch.manual_seed(self.seed)
        return NeuralNetwork().to(self.device)

    def warm_up(self) -> None:
        """One step each way, not timed: the first optimizer's import (torch._dynamo),
        the device's libraries."""
        batch = next(iter(self._loaders()["train"]))
        net = self._model()
        TrainStep(net, self.loss_fn, torch.optim.SGD(net.parameters(), lr=1e-3))(*batch)
        stacked.Pack([self._model(), self._model()], torch.optim.SGD, [{"lr": 1e-3}] * 2).step(
            *batch
        )
        _sync(self.device)

    def alone(self, lr: float, epochs: int, graph: bool) -> dict[str, float]:
        net = self._model()
        optimizer = torch.optim.SGD(net.parameters(), lr=lr)
        step = TrainStep(net, self.loss_fn, optimizer, graph)
        with redirect_stdout(StringIO()):
            for _ in range(epochs):
                train_one_epoch(self._loaders()["train"], step, self.device)
        return evaluate(self.test, net, self.loss_fn, self.device)  # ends on a sync

    def packed(self, lrs: list[float], epochs: int, graph: bool) -> list[dict[str, float]]:
        pack = stacked.Pack(
            [self._model() for _ in lrs],
            torch.optim.SGD,
            [{"lr": lr} for lr in lrs],
            cuda_graph=graph,
        )
        for _ in range(epochs):
            stacked.train_epoch([self._loaders()["train"]], pack)
        together = stacked.evaluate(self.test, pack)
        _sync(self.device)
        return together


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
