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


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 sums the per-batch losses as the tutorial's Python floats do (MPS has none)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _accumulator(device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=accumulator_dtype(device), device=device)


class CapturedStep:
    """A training step captured once in a CUDA graph and replayed, which removes the
    launch cost of its small kernels.

    `eager(X, y, zero_grad)` is the step as it runs eagerly; `zero_grad(set_to_none)`
    clears its gradients. The first `warmup` steps run eagerly on a side stream (as
    capture requires; they are real training steps), the next full batch is captured
    and replayed (a ragged last batch is not, even where it comes before), and a batch
    of another size runs eagerly, so every image is trained on exactly as in eager mode.
    """

    def __init__(
        self,
        eager: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor],
        zero_grad: Callable[[bool], None],
        warmup: int = 3,
    ) -> None:
        self.eager, self.zero_grad, self.warmup = eager, zero_grad, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps = 0

    def __call__(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        if self.steps == 1:
            self.shape = X.shape  # a full batch: the one to capture
        if self.graph is None and (self.steps <= self.warmup or X.shape != self.shape):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self.eager(X, y, True)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            self._capture(X, y)
        if X.shape != self.static_X.shape:
            # note: zero in place; setting grads to None would orphan the graph's buffers
            self.zero_grad(False)
            return self.eager(X, y, False)
        self.static_X.copy_(X)
        self.static_y.copy_(y)
        self.graph.replay()
        return self.static_loss

    def _capture(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.static_X, self.static_y = X.clone(), y.clone()
        self.graph = torch.cuda.CUDAGraph()
        self.zero_grad(True)  # grads are then allocated in the graph
        with torch.cuda.graph(self.graph):
            self.static_loss = self.eager(self.static_X, self.static_y, False)


class TrainStep:
    """One optimisation step of the tutorial: forward, loss, zero_grad, backward, step;
    with cuda_graph=True, captured in a CUDA graph and replayed (CapturedStep)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        optimizer: torch.optim.Optimizer,
        cuda_graph: bool = False,
        warmup: int = 3,
    ) -> None:
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.captured = (
            CapturedStep(self._eager, lambda none: optimizer.zero_grad(set_to_none=none), warmup)
            if cuda_graph
            else None
        )

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        return self.captured.graph if self.captured else None

    def __call__(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Trains on one batch; returns its loss as a tensor on the device (no sync),
        valid until the next call."""
        if self.captured:
            return self.captured(X, y)
        return self._eager(X, y)

    def _eager(self, X: torch.Tensor, y: torch.Tensor, zero_grad: bool = True) -> torch.Tensor:
        # Compute prediction error
        pred = self.model(X)
        loss = self.loss_fn(pred, y)

        # Backpropagation
        if zero_grad:
            self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def train_one_epoch(
    loader: Iterable,
    step: TrainStep,
    device: torch.device,
    log_interval: int = 100,
) -> dict[str, float]:
    """One pass over `loader`; returns the mean of the batch losses."""
    size = len(loader.dataset)
    step.model.train()
    total_loss = _accumulator(device)
    num_batches = 0
    for batch, (X, y) in enumerate(loader):
        X, y = X.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = step(X, y)
        total_loss += loss
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


# Images per forward pass when evaluating a split that lives on the device.
EVAL_SLICE = 16_384


def evaluate(
    loader: Iterable, model: nn.Module, loss_fn: Callable, device: torch.device
) -> dict[str, float]:
    """The tutorial's test(): the mean of the per-batch mean losses (batches of the
    loader's batch size, the ragged last one included) and the fraction classified
    correctly. A resident split is run through the model in a few large slices, and
    its per-image losses averaged batch by batch the tutorial's way."""
    size = len(loader.dataset)
    model.eval()
    total_loss = _accumulator(device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    num_batches = 0
    with torch.no_grad():
        if _averages_images(loss_fn) and hasattr(loader, "slices"):
            batch = loader.batch_size
            for X, y in loader.slices(EVAL_SLICE):
                pred = model(X)
                losses = nn.functional.cross_entropy(
                    pred, y, reduction="none", label_smoothing=loss_fn.label_smoothing
                )
                means = batch_means(losses, batch)
                total_loss += means.to(total_loss.dtype).sum()
                correct += (pred.argmax(1) == y).sum()
                num_batches += means.shape[-1]
        else:
            for X, y in loader:
                X, y = X.to(device, non_blocking=True), y.to(device, non_blocking=True)
                pred = model(X)
                total_loss += loss_fn(pred, y)
                correct += (pred.argmax(1) == y).sum()
                num_batches += 1
    return {"loss": (total_loss / num_batches).item(), "accuracy": correct.item() / size}


def batch_means(losses: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-image losses (the last dimension, in order) as the mean loss of each batch of
    `batch` images, the ragged last batch included: what a loss with reduction="mean"
    gives batch by batch."""
    full = losses.shape[-1] // batch * batch
    means = losses[..., :full].unflatten(-1, (-1, batch)).mean(-1)
    if full < losses.shape[-1]:  # the ragged last batch
        means = torch.cat([means, losses[..., full:].mean(-1, keepdim=True)], -1)
    return means


def _averages_images(loss_fn: Callable) -> bool:
    """The tutorial's loss: a batch's loss is the plain mean of its images' losses."""
    return (
        type(loss_fn) is nn.CrossEntropyLoss
        and loss_fn.reduction == "mean"
        and loss_fn.weight is None
    )
