"""The tutorial's train() and test() loops, made pure: they return metrics, not print them.

No Hydra, no MLflow here, so the benchmark runs with torch alone. The only output is
the tutorial's progress line every `log_interval` batches; that is also the only place
the training loop waits for the device (metrics accumulate on it otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


def _accumulator(device: torch.device) -> torch.Tensor:
    # float64 sums the per-batch losses as the tutorial's Python floats do (MPS has none)
    dtype = torch.float32 if device.type == "mps" else torch.float64
    return torch.zeros((), dtype=dtype, device=device)


def train_one_epoch(
    loader: Iterable,
    model: nn.Module,
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    log_interval: int = 100,
) -> dict[str, float]:
    """One pass over `loader`; returns the mean of the batch losses."""
    size = len(loader.dataset)
    model.train()
    total_loss = _accumulator(device)
    num_batches = 0
    for batch, (X, y) in enumerate(loader):
        X, y = X.to(device, non_blocking=True), y.to(device, non_blocking=True)

        # Compute prediction error
        pred = model(X)
        loss = loss_fn(pred, y)

        # Backpropagation
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        total_loss += loss.detach()
        num_batches += 1
        if batch % log_interval == 0:
            # note: .item() is a CPU-GPU sync point, so it happens only here
            loss, current = loss.item(), (batch + 1) * len(X)
            print(f"loss: {loss:>7f}  [{current:>5d}/{size:>5d}]")
            if not math.isfinite(loss):
                raise DivergedError(f"train/loss is {loss} at batch {batch}")
    mean_loss = (total_loss / num_batches).item()
    if not math.isfinite(mean_loss):
        raise DivergedError(f"train/loss is {mean_loss} (mean over the epoch)")
    return {"loss": mean_loss}


def evaluate(
    loader: Iterable, model: nn.Module, loss_fn: Callable, device: torch.device
) -> dict[str, float]:
    """The tutorial's test(): mean batch loss and the fraction classified correctly."""
    size = len(loader.dataset)
    model.eval()
    total_loss = _accumulator(device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    num_batches = 0
    with torch.no_grad():
        for X, y in loader:
            X, y = X.to(device, non_blocking=True), y.to(device, non_blocking=True)
            pred = model(X)
            total_loss += loss_fn(pred, y)
            correct += (pred.argmax(1) == y).sum()
            num_batches += 1
    return {"loss": (total_loss / num_batches).item(), "accuracy": correct.item() / size}
