"""A pack trained: the program of several trials of one sweep (core/stacked.py) run
through the run recipe (run.py) as its members join and leave. Imported when a pack
trains, not when Hydra finds its plugins (launchers/packed.py): it imports torch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from fashion_sweep.config import ConfigError, plain
from fashion_sweep.core import stacked
from fashion_sweep.core.data import DataError, load_splits, make_loaders
from fashion_sweep.launchers.packed import task_config
from fashion_sweep.preflight import check, prepare, resolve_device
from fashion_sweep.run import (
    SPLIT_TITLES,
    Member,
    Objective,
    build_model,
    capturable,
    run_epochs,
    trainer_tags,
)


class Packed:
    """A pack's program for run.run_epochs: the members' models stacked
    (core/stacked.py), in micro-batches of the smallest batch size where theirs differ,
    one training loader per member where their data orders differ; in a continuous pack
    members join (`add`) as others leave."""

    def __init__(
        self, splits: dict, members: list[DictConfig], device: Any, continuous: bool = False
    ) -> None:
        first = members[0]
        self.data, self.device = splits, device
        self.micro = min(cfg.data.batch_size for cfg in members)
        # a continuous pack's members may each be in another epoch: each its own order
        seeds = {cfg.trainer.seed for cfg in members}
        self.own_orders = first.data.shuffle and (continuous or len(seeds) > 1)
        self.shared = self._loaders(self.micro, first.data.shuffle, first.trainer.seed)
        self.evaluation: dict[int, dict] = {}  # batch size -> its loaders, for evaluation
        self.trials: list[Any] = []  # each member's trial number, by member number
        self.train: list[Any] = []  # each member's training loader, by position
        self.sizes: list[int] = []  # each member's batch size, by position
        self.log_interval = first.trainer.log_interval
        self.splits = [split for split in SPLIT_TITLES if split in self.shared]
        self.train_images = len(self.shared["train"].dataset)
        models, options = self._take(members)
        optimizer = get_class(first.optimizer._target_)
        cuda_graph = first.trainer.cuda_graph
        self.pack = stacked.Pack(models, optimizer, options, cuda_graph, list(self.sizes))

    def _loaders(self, batch_size: int, shuffle: bool, seed: int) -> dict:
        return make_loaders(self.data, "resident", batch_size, self.device, shuffle, seed=seed)

    def _take(self, members: list[DictConfig]) -> tuple[list, list[dict]]:
        """The members' models, each seeded as its trial alone seeds it, and optimizer
        options; their loaders."""
        models, options = [], []
        for cfg in members:
            size = cfg.data.batch_size
            if self.own_orders:
                self.train.append(self._loaders(self.micro, True, cfg.trainer.seed)["train"])
            if size not in self.evaluation:  # the tutorial's test loss is a mean over batches
                self.evaluation[size] = self._loaders(size, False, 0)
            self.sizes.append(size)
            self.trials.append(cfg.tracking.trial)
            models.append(build_model(cfg, self.device))
            kwargs = OmegaConf.to_container(cfg.optimizer, resolve=True)
            kwargs.pop("_target_")
            options.append({**kwargs, **capturable(cfg)})
        return models, options

    @property
    def ids(self) -> list[int]:
        return self.pack.ids

    @property
    def failed(self) -> dict[int, BaseException]:
        return self.pack.failed

    def train_epoch(self, epoch: int) -> list[float]:
        self.trained = len(self.pack)  # this epoch's members
        loaders = self.train if self.own_orders else [self.shared["train"]]
        return stacked.train_epoch(loaders, self.pack, self.log_interval)

    def evaluate(self, split: str) -> list[dict[str, float]]:
        return stacked.evaluate([self.evaluation[size][split] for size in self.sizes], self.pack)

    def state_dict(self, position: int) -> dict[str, Any]:
        return self.pack.state_dict(position)

    def keep(self, positions: list[int]) -> None:
        """The pack goes on with these members alone (their data orders with them)."""
        self.pack.keep(positions)
        self.train = [self.train[p] for p in positions] if self.own_orders else []
        self.sizes = [self.sizes[p] for p in positions]
        if positions:
            shown = ", ".join(str(self.trials[number]) for number in self.pack.ids)
            print(f"The pack goes on with trials {shown}")

    def add(self, members: list[Member]) -> None:
        """Members join, each from its own first epoch (a continuous pack)."""
        start = len(self.sizes)
        models, options = self._take([member.cfg for member in members])
        self.pack.add(models, options, self.sizes[start:])
        shown = ", ".join(str(member.cfg.tracking.trial) for member in members)
        print(f"Trials {shown} join the pack, each from its epoch 1; it trains {len(self.pack)}")

    def pruned(self, number: int, epoch: int, metric: str) -> None:
        pass  # the sweep's log says so, trial by trial

    def reports(self) -> contextlib.AbstractContextManager:
        from fashion_sweep.sweeps.pruning import one_round

        return one_round()

    def epoch_done(self, epoch: int, active: int, seconds: float, eval_seconds: float) -> None:
        print(
            f"Epoch {epoch}: {active} of {self.trained} trials train on "
            f"(the pack's epoch: {seconds:.2f} s training, {eval_seconds:.2f} s evaluation)"
        )


# join(outcomes of members that ended, by job number) -> the job configs that join
Join = Callable[[dict[int, Any]], list[DictConfig]]


def train_pack(configs: list[DictConfig], join: Join | None = None) -> dict[int, Any]:
    """Trains the jobs of one pack together; each job's outcome by its number: an
    Objective or the exception it failed with. With `join` (a continuous pack), members
    that end are handed to it after their epoch, and the jobs it returns join; what is
    returned is what it was not handed."""
    from fashion_sweep.tracking.writer import Writer  # MLflow: imported where a pack trains

    def take(handed: dict[int, Any]) -> tuple[list[Member], list[int]]:
        """The jobs `join` returns for the slots of those `handed` back, as members; one
        whose values check() refuses is handed back at once, for another."""
        joiners, joined = [], []
        while handed:
            refused: dict[int, Any] = {}
            new, numbers = _members(join(handed), refused)
            joiners, joined, handed = joiners + new, joined + numbers, refused
        return joiners, joined

    outcomes: dict[int, Any] = {}
    members, numbers = _members(configs, outcomes)
    if join is not None and outcomes:  # those refused give their slots back at once
        new, joined = take(outcomes)
        members, numbers, outcomes = members + new, numbers + joined, {}
    if not members:
        return outcomes
    first = members[0].cfg
    device = resolve_device(first.trainer.device)  # one for the pack: pack_key holds it
    try:
        prepare(first)
    except (ConfigError, DataError) as error:  # the data or the store: the whole pack
        return {**outcomes, **dict.fromkeys(numbers, error.with_traceback(None))}
    data = first.data
    splits = load_splits(data.root, data.train_size, data.val_size, data.test_size, data.split_seed)
    program = Packed(splits, [m.cfg for m in members], device, continuous=join is not None)
    trials = ", ".join(_name(m, n) for m, n in zip(members, numbers, strict=True))
    sizes = sorted({m.cfg.data.batch_size for m in members})
    micro = f" (batch sizes {', '.join(map(str, sizes))}, in micro-batches of {sizes[0]})"
    print(f"Packed {len(members)} trials: {trials}{micro if len(sizes) > 1 else ''}")
    metric = first.optimized_metric

    def outcome(trained: Any) -> Any:
        return trained if isinstance(trained, BaseException) else Objective.of(trained, metric)

    def refill(ended: dict[int, Any]) -> list[Member]:
        joiners, joined = take({numbers[n]: outcome(o) for n, o in ended.items()})
        names = [str(program.trials[n]) for n in program.pack.ids]  # those staying
        names += [_name(m, n) for m, n in zip(joiners, joined, strict=True)]
        for member in joiners:  # the pack it joined
            member.tags = {"pack": f"{len(names)} trials: {', '.join(names)}"}
        numbers.extend(joined)
        return joiners

    writer = Writer()  # the members' MLflow runs, written beside the training
    tags = {**trainer_tags(device), "pack": f"{len(members)} trials: {trials}"}
    try:
        done = run_epochs(program, members, writer, tags, refill if join else None)
    finally:
        writer.close()
    for number, trained in done.items():
        outcomes[numbers[number]] = outcome(trained)
    return outcomes


def _name(member: Member, number: int) -> str:
    """A member as a pack's lines name it: its trial, or its job outside our sweeper."""
    trial = member.cfg.tracking.trial
    return str(trial) if trial is not None else f"job {number}"


def _members(configs: list[DictConfig], failed: dict[int, Any]) -> tuple[list[Member], list[int]]:
    """The jobs' members (task configs, no hydra node, as run_job makes them) and job
    numbers; a job whose values check() refuses fails alone, into `failed`."""
    from fashion_sweep.sweeps.pruning import ended_elsewhere, pruning

    members, numbers = [], []
    for config in configs:
        cfg = task_config(config)
        try:
            check(cfg)
        except ConfigError as error:  # this member's values: it fails alone
            failed[config.hydra.job.num] = error.with_traceback(None)  # not the pack's memory
            continue
        overrides = [plain(line) for line in config.hydra.overrides.task]
        prune, ended = pruning(cfg, config.hydra), ended_elsewhere(cfg, config.hydra)
        members.append(Member(cfg, overrides, prune, ended))
        numbers.append(config.hydra.job.num)
    return members, numbers
