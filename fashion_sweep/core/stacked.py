"""Packed trials: several models of one shape trained at once, as one program.

A pack holds N members, each an ordinary NeuralNetwork's parameters: layer k's weights
of all members are one tensor [N, out, in], so one batched matmul runs a layer for all
of them, and one backward pass computes every member's gradients (the loss summed over
members: each member's gradient is its own loss's). The optimizer is torch.optim's own,
one param group per member whose params are that member's slices of the stacked tensors
(leaf tensors that share their storage): each member keeps its own learning rate,
momentum, weight decay, betas and optimizer state, and takes the step torch.optim takes
for the model alone. What the members share: the model's shape, the optimizer class
and the data; what differs per member: the optimizer's arguments, the seed (initial
weights, and the data order when shuffled) and the batch size.

Members of different batch sizes, each a multiple of the loaders' (the smallest), train
in micro-batches of that size (`train_epoch`): each member adds the gradient of its
micro-batch's share of its batch's mean loss (its per-image losses summed, over its
batch's size: the ragged last batch's own) and steps once its batch is complete, so its
step is the step the tutorial's mean loss gives it alone, with its data in its own order.

A member that diverges (NaN or infinite loss) is failed alone: members never mix, so
the others train on to the numbers they would have reached without it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from fashion_sweep.core.engine import CapturedStep, DivergedError, accumulator_dtype
from fashion_sweep.core.engine import evaluate as evaluate_model
from fashion_sweep.core.model import NeuralNetwork


class Pack:
    """N NeuralNetworks of one shape and their optimizers, stacked."""

    def __init__(
        self,
        models: list[NeuralNetwork],
        optimizer: Callable[..., torch.optim.Optimizer],
        options: list[dict[str, Any]],
        cuda_graph: bool = False,
        batch_sizes: list[int] | None = None,
    ) -> None:
        # one model of the shape, that evaluation loads each member's weights into
        self.model = copy.deepcopy(models[0])
        self.keys = list(self.model.state_dict())  # weight, bias of each Linear, in order
        per_key = [[model.state_dict()[key] for model in models] for key in self.keys]
        self.ids = list(range(len(models)))  # each member's number, in the order it joined
        self.joined = len(models)  # how many members the pack has had
        self.failed: dict[int, DivergedError] = {}  # member's number -> why it failed
        self.batch_sizes = batch_sizes  # each member's; None: the loaders' for all
        self._optimizer, self._cuda_graph = optimizer, cuda_graph
        self._build([torch.stack(tensors) for tensors in per_key], options)

    def _build(self, stacks: list[torch.Tensor], options: list[dict[str, Any]]) -> None:
        self.stacks = [stack.detach().requires_grad_() for stack in stacks]
        if not options:  # every member left a continuous pack: joiners may come
            self.members, self.optimizer, self.captured = [], None, None
            return
        # each member's parameters: leaves sharing the stacks' storage, so torch.optim's
        # in-place step on them is a step on the stacks
        self.members = [
            [nn.Parameter(stack.detach()[i]) for stack in self.stacks] for i in range(len(options))
        ]
        self.optimizer = self._optimizer(
            [
                {"params": params, **kwargs}
                for params, kwargs in zip(self.members, options, strict=True)
            ]
        )
        # the whole packed step captured in one CUDA graph (options need capturable=True
        # for an optimizer that keeps its state on the host, such as Adam's step count)
        self.captured = CapturedStep(self._eager, self.zero_grad) if self._cuda_graph else None

    def keep(self, positions: list[int]) -> None:
        """Goes on with the members at `positions` only (the others pruned, finished or
        failed), each with its weights and optimizer state: from here on the pack
        computes what they alone need (none: an empty pack, until members join). A
        captured step is captured anew."""
        saved = self.optimizer.state_dict()  # params by number, in group order
        state, groups, count = {}, [], 0
        for position in positions:  # the kept groups' params, numbered anew
            group = saved["param_groups"][position]
            numbers = list(range(count, count + len(group["params"])))
            for new, old in zip(numbers, group["params"], strict=True):
                if old in saved["state"]:  # a param with no step yet has none
                    state[new] = saved["state"][old]
            groups.append({**group, "params": numbers})
            count += len(numbers)
        self.ids = [self.ids[position] for position in positions]
        if self.batch_sizes is not None:
            self.batch_sizes = [self.batch_sizes[position] for position in positions]
        index = torch.tensor(positions, dtype=torch.long, device=self.stacks[0].device)
        options = [{k: v for k, v in group.items() if k != "params"} for group in groups]
        self._build([stack.detach()[index] for stack in self.stacks], options)
        if self.optimizer is not None:
            self.optimizer.load_state_dict({"state": state, "param_groups": groups})

    def add(
        self,
        models: list[NeuralNetwork],
        options: list[dict[str, Any]],
        batch_sizes: list[int] | None = None,
    ) -> list[int]:
        """Members join the pack (a continuous pack's, as others left it): each starts
        from its own model's weights and a fresh optimizer state, as its trial alone
        starts, while the members already here keep theirs. A captured step is captured
        anew. The joiners' numbers (after every number the pack has had)."""
        saved = self.optimizer.state_dict() if self.optimizer else {"state": {}, "param_groups": []}
        kept = [
            {k: v for k, v in group.items() if k != "params"} for group in saved["param_groups"]
        ]
        joined = list(range(self.joined, self.joined + len(models)))
        self.joined += len(models)
        per_key = [[model.state_dict()[key] for model in models] for key in self.keys]
        device = self.stacks[0].device
        stacks = [
            torch.cat([stack.detach(), torch.stack(new).to(device, stack.dtype)])
            for stack, new in zip(self.stacks, per_key, strict=True)
        ]
        self._build(stacks, [*kept, *options])
        # the members here keep their state and their groups' options as the optimizer
        # holds them; the joiners' groups are the ones torch.optim just made
        fresh = self.optimizer.state_dict()["param_groups"][len(kept) :]
        self.optimizer.load_state_dict(
            {"state": saved["state"], "param_groups": [*saved["param_groups"], *fresh]}
        )
        self.ids += joined
        if self.batch_sizes is not None:
            self.batch_sizes = [*self.batch_sizes, *(batch_sizes or [])]
        return joined

    def __len__(self) -> int:
        return len(self.members)

    def logits(self, X: torch.Tensor) -> torch.Tensor:
        """[N, classes, B] for a batch shared by all members ([B, ...]) or one batch per
        member ([N, B, ...])."""
        # note: activations are kept features-first ([N, features, B]), so that each
        # weight's gradient comes out of backward in the weight's own layout; batch-first,
        # autograd copied every gradient once more, which made the pack slower on a CPU
        # than its members one after another
        h = X.flatten(-3)  # the model's nn.Flatten: [.., 1, 28, 28] -> [.., 784]
        h = h.T if h.dim() == 2 else h.transpose(1, 2)
        layers = list(zip(self.stacks[0::2], self.stacks[1::2], strict=True))
        for k, (weight, bias) in enumerate(layers):
            if h.dim() == 2:  # one batch for all: one matmul against every member's weights
                n, out, features = weight.shape
                h = (weight.reshape(n * out, features) @ h).view(n, out, -1)
            else:
                h = torch.bmm(weight, h)
            h = h + bias.unsqueeze(2)
            if k < len(layers) - 1:
                h = torch.relu(h)
        return h

    def losses(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each member's per-image cross-entropy, [N, B]."""
        logits = self.logits(X)
        target = y.expand(logits.shape[0], -1) if y.dim() == 1 else y
        return nn.functional.cross_entropy(logits, target, reduction="none")

    def step(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimisation step of every member; their batch losses [N] (no sync),
        valid until the next call."""
        if self.captured:
            return self.captured(X, y)
        return self._eager(X, y)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for stack in self.stacks:
            if set_to_none:
                stack.grad = None
            elif stack.grad is not None:
                stack.grad.zero_()

    def _eager(self, X: torch.Tensor, y: torch.Tensor, zero_grad: bool = True) -> torch.Tensor:
        if zero_grad:
            self.zero_grad()
        losses = self.losses(X, y).mean(1)
        losses.sum().backward()
        # each member's grads: its slices of the stacks' (no copy)
        for k, stack in enumerate(self.stacks):
            for i, params in enumerate(self.members):
                params[k].grad = stack.grad[i]
        self.optimizer.step()
        return losses.detach()

    def accumulate(
        self, X: torch.Tensor, y: torch.Tensor, sizes: torch.Tensor, stepping: list[int]
    ) -> torch.Tensor:
        """One micro-batch: each member's gradient of its share of its batch's mean loss
        (its per-image losses summed, over `sizes`, its batch's size [N]) added to what
        its batch has gathered; the members at `stepping` have completed their batch:
        they step (the others' params have no grad, so torch.optim leaves them be), and
        their gradients start again from zero. The shares [N] (no sync)."""
        shares = self.losses(X, y).sum(1) / sizes
        shares.sum().backward()
        if stepping:
            chosen = set(stepping)
            for k, stack in enumerate(self.stacks):
                for i, params in enumerate(self.members):
                    params[k].grad = stack.grad[i] if i in chosen else None
            self.optimizer.step()
            rows = torch.tensor(stepping, device=self.stacks[0].device)
            for stack in self.stacks:
                stack.grad.index_fill_(0, rows, 0)
        return shares.detach()

    def weights(self, member: int) -> dict[str, torch.Tensor]:
        """The member at position `member` as a NeuralNetwork's state_dict of views into
        the stacks (they change as the pack trains)."""
        return {
            key: stack[member].detach() for key, stack in zip(self.keys, self.stacks, strict=True)
        }

    def state_dict(self, member: int) -> dict[str, torch.Tensor]:
        """The member at position `member` as exactly a NeuralNetwork's state_dict, a copy
        (for model.pth)."""
        return {key: tensor.clone() for key, tensor in self.weights(member).items()}


def train_epoch(loaders: list[Iterable], pack: Pack, log_interval: int = 100) -> list[float]:
    """One pass over the data for every member (one loader per member, in lockstep, or one
    shared loader); each member's mean batch loss. A member whose loss turns NaN or
    infinite is failed (pack.failed), the others go on."""
    micro = getattr(loaders[0], "batch_size", None)
    if pack.batch_sizes is not None and any(size != micro for size in pack.batch_sizes):
        return _train_epoch_accumulating(loaders, pack, micro, log_interval)
    shared = len(loaders) == 1
    total = None
    num_batches = 0
    for batch, items in enumerate(zip(*loaders, strict=True)):
        if shared:
            X, y = items[0]
        else:
            X, y = torch.stack([X for X, _ in items]), torch.stack([y for _, y in items])
        # a captured step's losses are its graph's buffer, overwritten by the next step:
        # read, never kept (in float64 a .to() of it is the buffer itself)
        losses = pack.step(X, y)
        if total is None:
            total = losses.to(accumulator_dtype(losses.device), copy=True)
        else:
            total += losses
        num_batches += 1
        if batch % log_interval == 0:
            _fail_diverged(pack, losses, f"at batch {batch}")
    means = (total / num_batches).tolist()
    _fail_diverged(pack, torch.tensor(means), "(mean over the epoch)")
    return means


def _train_epoch_accumulating(
    loaders: list[Any], pack: Pack, micro: int, log_interval: int
) -> list[float]:
    """train_epoch for members of different batch sizes, each a multiple of `micro`, the
    loaders' batch size: one pass in micro-batches, each member stepping after its own
    number of them (and at the epoch's end, its ragged last batch); each member's mean
    batch loss, as its trial alone counts it."""
    n = len(loaders[0].dataset)
    every = [size // micro for size in pack.batch_sizes]
    last = math.ceil(n / micro) - 1
    shared = len(loaders) == 1
    device = pack.stacks[0].device
    totals = torch.zeros(len(pack), dtype=accumulator_dtype(device), device=device)
    gathered = torch.zeros_like(totals)  # each member's batch loss so far
    batches = [0] * len(pack)
    pack.zero_grad()
    for index, items in enumerate(zip(*loaders, strict=True)):
        if shared:
            X, y = items[0]
        else:
            X, y = torch.stack([X for X, _ in items]), torch.stack([y for _, y in items])
        sizes = [
            min(size, n - (index // k) * size)
            for size, k in zip(pack.batch_sizes, every, strict=True)
        ]
        stepping = [i for i, k in enumerate(every) if index % k == k - 1 or index == last]
        shares = pack.accumulate(X, y, torch.tensor(sizes, dtype=X.dtype, device=device), stepping)
        gathered += shares.to(totals.dtype)
        if stepping:
            done = torch.zeros(len(pack), dtype=torch.bool, device=device)
            done[stepping] = True
            totals += torch.where(done, gathered, 0)
            gathered = torch.where(done, 0, gathered)
            for i in stepping:
                batches[i] += 1
        if index % log_interval == 0:
            _fail_diverged(pack, shares, f"at micro-batch {index}")
    means = (totals / torch.tensor(batches, dtype=totals.dtype, device=device)).tolist()
    _fail_diverged(pack, torch.tensor(means), "(mean over the epoch)")
    return means


def _fail_diverged(pack: Pack, losses: torch.Tensor, where: str) -> None:
    for member, loss in zip(pack.ids, losses.tolist(), strict=True):
        if member not in pack.failed and not math.isfinite(loss):
            pack.failed[member] = DivergedError(f"train/loss is {loss} {where}")


def evaluate(loader: Any, pack: Pack) -> list[dict[str, float]]:
    """engine.evaluate for every member, member by member, as each trial alone is
    evaluated (the same numbers exactly): a few large matmuls each, so batching the
    members gains nothing, and on a CPU all members at once evaluated 30% slower.
    `loader`: one for all, or a list, one per member (its own batch size: the tutorial's
    test loss is a mean over batches)."""
    device = pack.stacks[0].device
    results = []
    for member in range(len(pack)):
        pack.model.load_state_dict(pack.weights(member))  # copies them
        own = loader[member] if isinstance(loader, list) else loader
        results.append(evaluate_model(own, pack.model, nn.CrossEntropyLoss(), device))
    return results
