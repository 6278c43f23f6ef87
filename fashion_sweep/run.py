"""The run recipe: a config checked, its data, model and optimizer built, trained epoch by
epoch with each epoch's metrics tracked, pruned where its sweep says so, and its model
saved; then the tutorial's prediction.

`run_epochs` is the epoch loop, and `epoch_metrics` its metric keys, for a single run
(`train`, whose program is `Alone`) and for a pack of trials trained together
(launchers/packed.py) alike. What a run's records go to is a Tracker
(tracking/tracker.py): MLflow in this process, in a process beside it, or in a thread
beside a pack. Kept in one module (about 350 lines) so that the recipe reads top to
bottom in one file.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from inspect import signature
from typing import Any, NamedTuple, Protocol

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fashion_sweep import signals, threads
from fashion_sweep.config import ConfigError, optimized
from fashion_sweep.core.data import load_splits, make_loaders, prepare_raw
from fashion_sweep.core.engine import TrainStep, evaluate, train_one_epoch
from fashion_sweep.core.model import classify
from fashion_sweep.preflight import MODELS, TARGETS, check, in_process, prepare
from fashion_sweep.tracking.redaction import one_line
from fashion_sweep.tracking.tracker import Tracker

SPLIT_TITLES = {"val": "Validation Error", "test": "Test Error"}
# prune(epoch, value of optimized_metric, last epoch?) -> stop after this epoch?
Prune = Callable[[int, float, bool], bool]
# ended() -> why its sweep has ended the trial elsewhere (a resume found its sweep worker
# gone), None while the trial is its own to run
Ended = Callable[[], str | None]


class CutOff(Exception):
    """A member whose sweep ended its trial while it trained: it stopped, its run KILLED
    as the sweep ended it; nothing of it is recorded."""


def capturable(cfg: DictConfig) -> dict[str, bool]:
    """The optimizer's extra argument for a captured step: it must keep its state on the
    device (Adam's step count), where the optimizer has that option."""
    if (
        cfg.trainer.cuda_graph
        and "capturable" in signature(get_class(cfg.optimizer._target_)).parameters
    ):
        return {"capturable": True}
    return {}


def build_model(cfg: DictConfig, device: torch.device) -> nn.Module:
    """The trial's model on `device`, its weights seeded by trainer.seed."""
    torch.manual_seed(cfg.trainer.seed)
    return instantiate(cfg.model, _execution_whitelist_=TARGETS).to(device)


def trainer_tags(device: torch.device) -> dict[str, str]:
    """A training run's tags from the process that trains it."""
    return {
        "device": str(device),
        "threads": str(torch.get_num_threads()),  # torch's, for its CPU kernels
        "torch_version": str(torch.__version__),  # not torch's own str type (a pickle)
        "process": f"{socket.gethostname()}:{os.getpid()}",  # which worker trained it
    }


class Trained(NamedTuple):
    metrics: dict[str, float]  # the last epoch's: `train/loss`, `test/accuracy`, ...
    run_id: str  # the MLflow run that logged them
    pruned: int | None = None  # the epoch a sweep's pruner stopped it after, if it did


class Objective(float):
    """What a job returns to the sweeper: the optimized metric's value, carrying the
    MLflow run that has the rest, so the sweeper links trial and run without a search."""

    run_id: str
    pruned: int | None  # the epoch the trial was pruned after (its study records PRUNED)

    def __new__(cls, value: float, run_id: str, pruned: int | None = None) -> Objective:
        self = super().__new__(cls, value)
        self.run_id, self.pruned = run_id, pruned
        return self

    @classmethod
    def of(cls, trained: Trained, metric: Any) -> Objective | Objectives:
        """The value of `metric` (optimized_metric); a list of them: an Objectives."""
        if not isinstance(metric, str):
            values = tuple(trained.metrics[m] for m in metric)
            return Objectives(values, trained.run_id, trained.pruned)
        return cls(trained.metrics[metric], trained.run_id, trained.pruned)

    def __reduce__(self) -> tuple[Any, ...]:  # to launchers that pickle the result
        return (Objective, (float(self), self.run_id, self.pruned))


class Objectives(tuple):
    """A multi-objective trial's values (optimized_metric's list, in its order), with
    its MLflow run, as Objective carries one value."""

    run_id: str
    pruned: int | None

    def __new__(
        cls, values: tuple[float, ...], run_id: str, pruned: int | None = None
    ) -> Objectives:
        self = super().__new__(cls, values)
        self.run_id, self.pruned = run_id, pruned
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (Objectives, (tuple(self), self.run_id, self.pruned))


def epoch_metrics(
    train_loss: float,
    evaluated: dict[str, dict[str, float]],
    train_seconds: float,
    eval_seconds: float,
    train_images: int,
) -> dict[str, float]:
    """One epoch's metrics, as MLflow records them: `split/name`, and the time the
    epoch's training and evaluation took (a pack's divided among its members)."""
    metrics = {"train/loss": train_loss}
    for split, result in evaluated.items():
        metrics[f"{split}/loss"] = result["loss"]
        metrics[f"{split}/accuracy"] = result["accuracy"]
    metrics["perf/eval_seconds"] = eval_seconds
    metrics["perf/epoch_seconds"] = train_seconds
    metrics["perf/samples_per_second"] = train_images / train_seconds
    return metrics


@dataclass
class Member:
    """One trial a program trains: its config, overrides and pruner, its run once open."""

    cfg: DictConfig
    overrides: list[str]
    prune: Prune | None = None
    ended: Ended | None = None  # asked after each epoch, before anything of it is logged
    run: Any = None  # its tracker's handle
    epoch: int = 0  # its epochs trained (in a continuous pack, its own count)
    tags: dict[str, str] = field(default_factory=dict)  # its run's own, beside the program's


# refill(outcomes of the members that ended, by number) -> the members that join
# (launchers/packed.py: a continuous pack's next trials)
Refill = Callable[[dict[int, "Trained | BaseException"]], list[Member]]


class Program(Protocol):
    """What trains the members of run_epochs: one model (Alone) or a pack of them
    (launchers/packed.py). Members are numbered as given, joiners after them; `ids` are
    the numbers of those it still trains, by position."""

    ids: list[int]
    failed: dict[int, BaseException]  # member number -> its DivergedError (a pack's)
    splits: list[str]  # what is evaluated after each epoch: val (if any), test
    train_images: int

    def train_epoch(self, epoch: int) -> list[float]: ...
    def evaluate(self, split: str) -> list[dict[str, float]]: ...
    def state_dict(self, position: int) -> dict[str, torch.Tensor]: ...
    def keep(self, positions: list[int]) -> None: ...
    def add(self, members: list[Member]) -> None: ...  # where it takes joiners (Refill)
    def pruned(self, number: int, epoch: int, metric: str) -> None: ...
    def epoch_done(self, epoch: int, active: int, seconds: float, eval_seconds: float) -> None: ...
    def reports(self) -> contextlib.AbstractContextManager: ...  # around an epoch's reports


def run_epochs(
    program: Program,
    members: list[Member],
    tracker: Tracker,
    tags: dict[str, str],
    refill: Refill | None = None,
) -> dict[int, Trained | BaseException]:
    """Opens each member's run, then trains the program epoch by epoch (`epoch`) until
    every member has ended. On an interruption every open run ends KILLED, on any other
    error FAILED. Each member's outcome by number: Trained, or its error. With `refill`
    (a continuous pack), the outcomes go to it instead, after each epoch in which
    members ended, their runs ended in the store; the members it returns join, each
    from its own first epoch. On a CPU the process holds its place among this machine's
    training processes, and with trainer.share_cores each epoch takes its share of the
    cores (threads.py); the `threads` tag says the first."""
    take = members[0].cfg.trainer.share_cores
    with threads.shared(tags["device"] == "cpu", take) as share:
        _fit(share)
        tags = {**tags, "threads": str(torch.get_num_threads())}
        return _run_epochs(program, members, tracker, tags, share, refill)


def _fit(share: threads.Share | None) -> None:
    if share is not None and (said := share.fit()):
        print(said)


def _run_epochs(
    program: Program,
    members: list[Member],
    tracker: Tracker,
    tags: dict[str, str],
    share: threads.Share | None,
    refill: Refill | None,
) -> dict[int, Trained | BaseException]:
    outcomes: dict[int, Trained | BaseException] = {}
    active: list[int] = []  # the members whose run is open and unfinished
    try:
        _open(members, 0, active, tracker, tags)
        for epoch in itertools.count(1):  # the program's; each member counts its own
            if epoch > 1:
                _fit(share)
            at = {number: position for position, number in enumerate(program.ids)}
            ended = train_epoch(program, members, active, tracker, epoch)
            if len(active) < len(program.ids) and (active or refill):  # those that ended
                program.keep([at[number] for number in active])
            if refill is None or not ended:
                outcomes |= ended
            else:
                tracker.flush()  # their runs ended in the store before they are recorded
                handed = {n: _recorded(tracker, members[n].run, o) for n, o in ended.items()}
                try:
                    joiners = refill(handed)
                except BaseException as error:  # the sweep stopped: none of theirs failed
                    why = signals.reason(error) if isinstance(error, KeyboardInterrupt) else None
                    _end_all(
                        tracker, [members[n].run for n in active], "KILLED", why or one_line(error)
                    )
                    active.clear()
                    raise
                if joiners:
                    program.add(joiners)
                    members.extend(joiners)
                    _open(members, len(members) - len(joiners), active, tracker, tags)
            if not active:
                break
        tracker.flush()  # every run ended in the store before any trial is recorded
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP: every open run KILLED
        _end_all(tracker, [members[n].run for n in active], "KILLED", signals.reason(stop))
        raise
    except BaseException as error:
        _end_all(tracker, [members[n].run for n in active], "FAILED", one_line(error))
        raise
    return {number: _recorded(tracker, members[number].run, o) for number, o in outcomes.items()}


def _open(
    members: list[Member], first: int, active: list[int], tracker: Tracker, tags: dict
) -> None:
    """Opens the runs of the members from number `first` on; they are active."""
    for number in range(first, len(members)):
        member = members[number]
        resolved = OmegaConf.to_container(member.cfg, resolve=True, enum_to_str=True)
        member.run = tracker.open_run(resolved, {**tags, **member.tags}, member.overrides)
        active.append(number)


def train_epoch(
    program: Program,
    members: list[Member],
    active: list[int],
    tracker: Tracker,
    epoch: int,
) -> dict[int, Trained | BaseException]:
    """One epoch of the program (its `epoch`-th), each member's next; then for each
    active member its metrics logged and its pruner asked. A member's run ends (and it
    leaves `active`) FINISHED after its last epoch or the one its pruner stopped it
    after, its model.pth first, FAILED when it diverged or its records failed, and
    KILLED (a CutOff) when its sweep has ended its trial meanwhile. The outcomes of
    those that ended, by number."""
    metric, epochs = optimized(members[0].cfg)[0], members[0].cfg.trainer.epochs
    start = time.perf_counter()
    losses = program.train_epoch(epoch)
    seconds, start = time.perf_counter() - start, time.perf_counter()
    evaluated = {split: program.evaluate(split) for split in program.splits}
    eval_seconds, share = time.perf_counter() - start, len(program.ids)
    ended: dict[int, Trained | BaseException] = {}
    finishing: list[tuple[int, Trained]] = []  # ended after their metrics and pruners
    # a pack's reports read its study once (sweeps/pruning.py): the round holds no wait
    # for the store, so what other workers write is at most its reports old
    with program.reports():
        for position, number in enumerate(program.ids):
            if number not in active:
                continue
            members[number].epoch += 1
            own, last = members[number].epoch, members[number].epoch == epochs
            run, prune = members[number].run, members[number].prune
            error = tracker.error(run) or program.failed.get(number)
            if error is not None:  # its records failed, or it diverged
                active.remove(number)  # first: an interruption from here on leaves it be
                tracker.end_run(run, "FAILED", one_line(error))
                ended[number] = error.with_traceback(None)
                continue
            why = members[number].ended() if members[number].ended else None
            if why is not None:  # a resume took it over: its run stays as the sweep ended it
                active.remove(number)
                tracker.end_run(run, "KILLED", why)
                ended[number] = CutOff(why)
                continue
            results = {split: evaluated[split][position] for split in evaluated}
            train_images = program.train_images
            metrics = epoch_metrics(
                losses[position], results, seconds / share, eval_seconds / share, train_images
            )
            if metric in metrics:  # first: MLflow's compare view opens on the first it was sent
                metrics = {metric: metrics[metric], **metrics}
            tracker.log_metrics(run, metrics, own)
            stop = prune is not None and prune(own, metrics[metric], last)
            if stop or last:
                if stop:
                    tracker.mark_pruned(run, own)
                    program.pruned(number, own, metric)
                if members[number].cfg.tracking.log_model:
                    tracker.log_model(run, program.state_dict(position))
                finishing.append((number, Trained(metrics, "", own if stop else None)))
    for number, trained in finishing:
        tracker.sync()  # an error in a call not waited for fails it here
        active.remove(number)
        tracker.end_run(members[number].run, "FINISHED")
        ended[number] = trained
    program.epoch_done(epoch, len(active), seconds, eval_seconds)
    return ended


def _end_all(tracker: Tracker, runs: list[Any], status: str, reason: str) -> None:
    for run in runs:
        tracker.end_run(run, status, reason)
    tracker.flush(abandon=True)  # a second interruption leaves what is queued


def _recorded(tracker: Tracker, run: Any, outcome: Any) -> Trained | BaseException:
    """A finished member's outcome once its records are in: its run's id, or the error
    that failed a write after its last epoch (its run was ended FAILED)."""
    if isinstance(outcome, BaseException):
        return outcome
    error = tracker.error(run)
    if error is not None:
        return error.with_traceback(None)
    return outcome._replace(run_id=tracker.run_id(run))


class Alone:
    """A single run's program: the tutorial's model, step and loaders, with its lines."""

    def __init__(self, model: nn.Module, step: TrainStep, loaders: dict, cfg: DictConfig):
        self.model, self.step, self.loaders = model, step, loaders
        self.failed: dict[int, BaseException] = {}  # stays empty: a divergence raises
        self.device = next(model.parameters()).device
        self.log_interval = cfg.trainer.log_interval
        self.ids = [0]
        self.splits = [split for split in SPLIT_TITLES if split in loaders]
        self.train_images = len(loaders["train"].dataset)

    def train_epoch(self, epoch: int) -> list[float]:
        print(f"Epoch {epoch}\n-------------------------------")
        train = self.loaders["train"]
        return [train_one_epoch(train, self.step, self.device, self.log_interval)["loss"]]

    def evaluate(self, split: str) -> list[dict[str, float]]:
        result = evaluate(self.loaders[split], self.model, self.step.loss_fn, self.device)
        print(
            f"{SPLIT_TITLES[split]}: \n Accuracy: {(100 * result['accuracy']):>0.1f}%, "
            f"Avg loss: {result['loss']:>8f} \n"
        )
        return [result]

    def state_dict(self, position: int) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def keep(self, positions: list[int]) -> None:
        pass  # one member: when it leaves, the loop ends

    def add(self, members: list[Member]) -> None:
        raise NotImplementedError("a single run takes no joiners")

    def pruned(self, number: int, epoch: int, metric: str) -> None:
        print(f"Pruned after epoch {epoch}: its {metric} is behind")

    def reports(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def epoch_done(self, epoch: int, active: int, seconds: float, eval_seconds: float) -> None:
        pass


def train(
    cfg: DictConfig,
    overrides: list[str] | None = None,
    prune: Prune | None = None,
    tracker: Tracker | None = None,
    ended: Ended | None = None,
) -> Trained:
    """Seed, data, model, optimizer, then the epoch loop as one tracked run (run_epochs)
    and the tutorial's prediction. In a sweep with a pruner, `prune` after each epoch
    may stop it (not after its last: a trial that trained in full is complete); in a
    sweep, `ended` after each epoch says whether the sweep has ended it (CutOff)."""
    device = check(cfg)
    tracker = tracker or in_process()
    prepare(cfg, tracker)
    print(f"Using {device} device")

    data = cfg.data
    # the torch loader is the tutorial's path, torchvision's dataset included
    reader = "torchvision" if data.loader == "torch" else "idx"
    splits = load_splits(
        data.root, data.train_size, data.val_size, data.test_size, data.split_seed, reader
    )
    loaders = make_loaders(
        splits,
        data.loader,
        data.batch_size,
        device,
        data.shuffle,
        data.num_workers,
        cfg.trainer.seed,
    )
    model = build_model(cfg, device)
    optimizer = instantiate(
        cfg.optimizer,
        params=model.parameters(),
        _convert_="all",
        _execution_whitelist_=TARGETS,
        **capturable(cfg),
    )
    step = TrainStep(model, nn.CrossEntropyLoss(), optimizer, cuda_graph=cfg.trainer.cuda_graph)

    member = Member(cfg, overrides or [], prune, ended)
    (outcome,) = run_epochs(
        Alone(model, step, loaders, cfg), [member], tracker, trainer_tags(device)
    ).values()
    if isinstance(outcome, BaseException):  # cut off (these trackers raise their errors)
        raise outcome
    print("Done!")
    if cfg.tracking.log_model:  # the tutorial's torch.save(model.state_dict(), ...)
        print(f"Saved PyTorch Model State to model.pth in MLflow run {outcome.run_id}")
    predicted, actual = classify(model, splits["test"], 0)
    print(f'Predicted: "{predicted}", Actual: "{actual}"')
    return outcome


@functools.cache
def settle_heap() -> None:
    """After a process's first trial: what is alive now (modules, datasets, stores)
    lives as long as the process, so the garbage collector stops walking it. A full
    pass over it takes 0.2 s here, and came every few trials."""
    gc.collect()
    gc.freeze()


def predict(cfg: DictConfig) -> tuple[str, str, str]:
    """The tutorial's last step with a logged model: (run id, predicted, actual) for
    test image `cfg.index` (conf/predict.yaml)."""
    from fashion_sweep.tracking.lookup import load_run, resolve_run_id

    if not 0 <= cfg.index < 10_000:
        raise ConfigError(f"index must be in [0, 10000), got {cfg.index}")
    run_id = resolve_run_id(cfg.tracking.uri, cfg.tracking.experiment, cfg.run_id)
    run_cfg, state_dict = load_run(cfg.tracking.uri, run_id)
    model = instantiate(run_cfg.model, _execution_whitelist_=MODELS)
    model.load_state_dict(state_dict)
    prepare_raw(cfg.data.root, cfg.data.download)
    test = load_splits(cfg.data.root)["test"]
    return (run_id, *classify(model, test, cfg.index))
