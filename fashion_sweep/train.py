"""`python -m fashion_sweep.train [key=value ...]`: the PyTorch Quickstart, tracked in MLflow.

`-m sweep=optuna` turns the same command into an Optuna sweep (see conf/sweep/).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # a single run: its MLflow process starts now, beside torch's import
    from fashion_sweep import agent

    agent.start(sys.argv[1:])

import contextlib
import functools
import gc
import itertools
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from inspect import signature
from types import ModuleType
from typing import Any, NamedTuple

import hydra
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fashion_sweep import agent, signals
from fashion_sweep.agent import Agent, AgentError
from fashion_sweep.compose import ComposeOnce, plain
from fashion_sweep.config import CONF_DIR, ConfigError, register_configs, validate
from fashion_sweep.data import DataError, load_splits, make_loaders, prepare_raw
from fashion_sweep.engine import DivergedError, TrainStep, evaluate, train_one_epoch
from fashion_sweep.redaction import mask_log_records, one_line
from fashion_sweep.signals import interrupts

# What a config's _target_ may name (Hydra 1.4 asks instantiate() for a whitelist).
TARGETS = ["fashion_sweep.model.*", "torch.optim.*"]
# What hydra.callbacks may name (conf/train.yaml, conf/sweep/optuna.yaml).
CALLBACKS = [
    "fashion_sweep.redaction.RedactHydraFiles",
    "fashion_sweep.study.ReportToStudy",
    "fashion_sweep.train.CheckJobs",
]
NO_PRUNER = "optuna.pruners.NopPruner"
SPLIT_TITLES = {"val": "Validation Error", "test": "Test Error"}


def resolve_device(name: str) -> torch.device:
    """auto: cuda, then mps, then cpu; a named device must exist here."""
    name = getattr(name, "value", name)  # a Device enum from the config, or a str
    available = ["cpu"]
    if torch.cuda.is_available():
        available.insert(0, "cuda")
    if torch.backends.mps.is_available():
        available.insert(-1, "mps")
    if name == "auto":
        return torch.device(available[0])
    if name not in available:
        raise ConfigError(
            f"trainer.device={name}, but {name} is not available on this machine "
            f"(available: {', '.join(available)})"
        )
    return torch.device(name)


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

    def __reduce__(self) -> tuple[Any, ...]:  # to launchers that pickle the result
        return (Objective, (float(self), self.run_id, self.pruned))


# Optimizer options that torch refuses only at a first step (capturable Adam on a CPU;
# differentiable, on a model's own params), which check() therefore takes
STEP_CHECKED = ("capturable", "fused", "differentiable")


def check(cfg: DictConfig, try_step: bool = True) -> torch.device:
    """The config's values, and the device they name; raises ConfigError. An optimizer
    option of STEP_CHECKED is tried with one zero-gradient step on that device, unless
    try_step is false (a process that will not train, which must not hold a CUDA context:
    the runs it starts check for themselves)."""
    validate(cfg)
    device = resolve_device(cfg.trainer.device)
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    target = optimizer.pop("_target_")
    if any(fnmatch(target, allowed) for allowed in TARGETS):  # instantiate() refuses the rest
        try:  # what torch refuses in combination (nesterov with dampening), on one tensor
            get_class(target)([torch.zeros(1, requires_grad=True)], **optimizer)
        except (ImportError, TypeError, ValueError, RuntimeError) as error:
            raise ConfigError(f"optimizer: {str(error).splitlines()[0]}", ("optimizer",)) from None
        if try_step and any(optimizer.get(option) for option in STEP_CHECKED):
            try:
                param = torch.zeros(1, device=device, requires_grad=True)
                param.grad = torch.zeros_like(param)
                get_class(target)([param], **optimizer).step()
            except (RuntimeError, AssertionError, TypeError, ValueError) as error:
                why = f"{str(error).splitlines()[0]} (at a first step on {device})"
                raise ConfigError(f"optimizer: {why}", ("optimizer",)) from None
    if cfg.trainer.cuda_graph and device.type != "cuda":
        raise ConfigError(f"trainer.cuda_graph=true needs CUDA, but this run is on {device}")
    return device


# What does a run's MLflow work: fashion_sweep/tracking.py in this process, or an
# Agent (fashion_sweep/agent.py) that calls it in a process of its own.
Tracker = ModuleType | Agent


def in_process() -> ModuleType:
    # note: imported after the checks, so bad input fails without waiting for mlflow
    from fashion_sweep import tracking

    return tracking


def prepare(cfg: DictConfig, tracker: Tracker | None = None) -> None:
    """The data files (unpacked on first use), then the MLflow store (reached, and set
    up on first use). Raises DataError or StoreError in one line (from an Agent: with
    its next call waited for)."""
    prepare_raw(cfg.data.root, cfg.data.download)
    (tracker or in_process()).use_experiment(cfg.tracking.uri, cfg.tracking.experiment)


def preflight(cfg: DictConfig, try_step: bool = True) -> torch.device:
    """What a run needs, checked before it starts: check(), then prepare()."""
    device = check(cfg, try_step)
    prepare(cfg)
    return device


@contextmanager
def tracked_run(
    tracker: Tracker, cfg: DictConfig, tags: dict[str, str], overrides: list[str]
) -> Iterator[str]:
    """One MLflow run, FINISHED when the block ends, FAILED (or KILLED) when it raises;
    the resolved config its params and config.yaml (fashion_sweep/tracking.py)."""
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    tags = {**tags, **trainer_tags()}
    run_id = None
    try:
        run_id = tracker.start_run(resolved, tags, overrides)
        yield run_id
        tracker.sync()  # an error in a call not waited for (the metrics) fails the run
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP (fashion_sweep/signals.py)
        _end(tracker, cfg.tracking.uri, run_id, "KILLED", signals.reason(stop))
        raise
    except BaseException as error:
        _end(tracker, cfg.tracking.uri, run_id, "FAILED", one_line(error))
        raise
    else:
        _end(tracker, cfg.tracking.uri, run_id, "FINISHED", None)


def trainer_tags() -> dict[str, str]:
    """A training run's tags from the process that trains it."""
    return {
        "torch_version": str(torch.__version__),  # not torch's own str type (the agent)
        "process": f"{socket.gethostname()}:{os.getpid()}",  # which worker trained it
    }


def _end(tracker: Tracker, uri: str, run_id: str | None, status: str, why: str | None) -> None:
    """Ends the run, from this process if its MLflow process is gone."""
    try:
        tracker.end_active_run(status, why)
    except AgentError:
        if run_id is not None:
            in_process().end_run_by_id(uri, run_id, status, why)


def capturable(cfg: DictConfig) -> dict[str, bool]:
    """The optimizer's extra argument for a captured step: it must keep its state on the
    device (Adam's step count), where the optimizer has that option."""
    if (
        cfg.trainer.cuda_graph
        and "capturable" in signature(get_class(cfg.optimizer._target_)).parameters
    ):
        return {"capturable": True}
    return {}


def train(
    cfg: DictConfig,
    overrides: list[str] | None = None,
    prune: Callable[[int, float, bool], bool] | None = None,
    tracker: Tracker | None = None,
) -> Trained:
    """Seed, data, model, optimizer, a tracked run of the epoch loop. In a sweep with a
    pruner, `prune(epoch, value of optimized_metric, last)` after each epoch may stop it
    (not after its last: a trial that trained in full is complete)."""
    device = check(cfg)
    tracker = tracker or in_process()
    prepare(cfg, tracker)
    from fashion_sweep.predict import predict_one

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

    torch.manual_seed(cfg.trainer.seed)
    model = instantiate(cfg.model, _execution_whitelist_=TARGETS).to(device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = instantiate(
        cfg.optimizer,
        params=model.parameters(),
        _convert_="all",
        _execution_whitelist_=TARGETS,
        **capturable(cfg),
    )
    step = TrainStep(model, loss_fn, optimizer, cuda_graph=cfg.trainer.cuda_graph)

    pruned = None
    with tracked_run(tracker, cfg, {"device": str(device)}, overrides or []) as run_id:
        for epoch in range(1, cfg.trainer.epochs + 1):
            print(f"Epoch {epoch}\n-------------------------------")
            start = time.perf_counter()
            result = train_one_epoch(loaders["train"], step, device, cfg.trainer.log_interval)
            seconds = time.perf_counter() - start
            metrics = {"train/loss": result["loss"]}
            start = time.perf_counter()
            for split, title in SPLIT_TITLES.items():
                if split not in loaders:
                    continue
                result = evaluate(loaders[split], model, loss_fn, device)
                metrics[f"{split}/loss"] = result["loss"]
                metrics[f"{split}/accuracy"] = result["accuracy"]
                print(
                    f"{title}: \n Accuracy: {(100 * result['accuracy']):>0.1f}%, "
                    f"Avg loss: {result['loss']:>8f} \n"
                )
            metrics["perf/eval_seconds"] = time.perf_counter() - start
            metrics["perf/epoch_seconds"] = seconds
            metrics["perf/samples_per_second"] = len(loaders["train"].dataset) / seconds
            tracker.log_epoch(metrics, epoch)
            last = epoch == cfg.trainer.epochs  # a trial that trained in full is complete
            if prune is not None and prune(epoch, metrics[cfg.optimized_metric], last):
                pruned = epoch
                tracker.mark_pruned(epoch)
                print(f"Pruned after epoch {epoch}: its {cfg.optimized_metric} is behind")
                break
        print("Done!")
        if cfg.tracking.log_model:  # the tutorial's torch.save(model.state_dict(), ...)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.pth")
                torch.save(model.state_dict(), path)
                tracker.log_artifact(path)
            print(f"Saved PyTorch Model State to model.pth in MLflow run {run_id}")
        predicted, actual = predict_one(model, splits["test"], 0)
        print(f'Predicted: "{predicted}", Actual: "{actual}"')
    return Trained(metrics, run_id, pruned)


class CheckJobs(Callback):
    """A plain multirun (`-m optimizer.lr=0,0.1`, Hydra's basic sweeper) checks every
    job's config as a run would (check, prepare) before the first job starts, and refuses
    a bad one in one line (exit status 2); Optuna sweeps check theirs in
    fashion_sweep/sweep.py."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.hydra.sweeper._target_.endswith(".BasicSweeper"):
            return
        loader = ComposeOnce(GlobalHydra.instance().config_loader())
        params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
        parser = OverridesParser.create()
        parsed = parser.parse_overrides([*params, *config.hydra.overrides.task])
        swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
        jobs = _jobs(parsed)
        try:
            configs = [loader.load_sweep_config(config, job) for job in jobs]
        except Exception:  # a key that is not there, ...: Hydra's sweeper says so itself
            return
        # every job's values first, then data and store; each job, where it trains, takes
        # check()'s first optimizer step itself
        for step in (functools.partial(check, try_step=False), prepare):
            for number, (job, run) in enumerate(zip(jobs, configs, strict=True)):
                try:
                    step(run)
                except (ConfigError, DataError) as error:
                    which = " ".join(line for line in job if line.split("=")[0] in swept)
                    # note: Hydra turns a callback's exceptions into warnings: exit here
                    print(f"error: job {number} ({which}): {error}", file=sys.stderr)
                    sys.exit(2)


def _jobs(parsed: list[Override]) -> list[list[str]]:
    """The jobs of a plain multirun, in the basic sweeper's order: every combination of
    the comma-separated values (a later override of a key replaces an earlier one)."""
    lines: dict[str, list[str]] = {}
    for override in parsed:
        key = override.get_key_element()
        if override.is_discrete_sweep():
            lines[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        elif override.is_sweep_override():
            return []  # ranges and intervals: the sweeper refuses them itself
        else:
            lines[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*lines.values())]


register_configs()
mask_log_records()  # whatever logs a URI in this process (a launcher, a store) masks it


@hydra.main(config_path=CONF_DIR, config_name="train", execution_whitelist=CALLBACKS)
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    tracker = agent.take()  # a single run's MLflow process, started by __main__
    if tracker is not None and multirun:  # hydra.mode=MULTIRUN, set without -m
        tracker.close()
        tracker = None
    try:
        with interrupts():  # also in a launcher's worker process (joblib)
            overrides = [plain(o) for o in hydra_cfg.overrides.task]
            metrics, run_id, pruned = train(cfg, overrides, pruning(cfg, hydra_cfg), tracker)
        return Objective(metrics[cfg.optimized_metric], run_id, pruned)
    except (ConfigError, DataError, DivergedError, AgentError) as error:
        if multirun:
            raise  # the sweeper records the trial as failed and goes on
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1 if isinstance(error, DivergedError | AgentError) else 2)
    finally:
        if tracker is not None:
            tracker.close()
        if multirun:
            settle_heap()


def pruning(cfg: DictConfig, hydra_cfg: DictConfig) -> Callable[[int, float, bool], bool] | None:
    """A trial's link to its study's pruner, where its sweep has one (fashion_sweep/
    sweeper.py, hydra.sweeper.pruner); None for a single run, which imports no Optuna."""
    pruner = hydra_cfg.sweeper.get("pruner") if hydra_cfg.mode == RunMode.MULTIRUN else None
    if not pruner or pruner._target_ == NO_PRUNER or cfg.tracking.trial is None:
        return None
    from fashion_sweep.study import Pruning

    return Pruning(hydra_cfg.sweeper.storage, cfg.tracking.study, cfg.tracking.trial, pruner)


@functools.cache
def settle_heap() -> None:
    """After a process's first trial: what is alive now (modules, datasets, stores)
    lives as long as the process, so the garbage collector stops walking it. A full
    pass over it takes 0.2 s here, and came every few trials."""
    gc.collect()
    gc.freeze()


if __name__ == "__main__":
    # note: run the imported module's main, not __main__'s, so the joblib launcher can
    # pickle the task function by reference (a __main__ function is pickled by value)
    from fashion_sweep.train import main as entry_point

    try:
        with interrupts():  # the sweep's own work between trials too
            entry_point()
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP: the runs are ended
        with contextlib.suppress(OSError):  # no terminal left (SIGHUP)
            print(f"error: {signals.reason(stop)}", file=sys.stderr)
        signals.exit_like(stop)
