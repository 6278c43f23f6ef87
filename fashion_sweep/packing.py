"""`hydra/launcher=packed`: the trials a sweep asks for at once, trained together.

`python -m fashion_sweep.train -m sweep=optuna hydra/launcher=packed
hydra.sweeper.n_jobs=32` hands the launcher 32 jobs at a time. It composes each job's
config, groups the jobs that share what a pack must share (the model, the data and its
loader, the optimizer's class, the trainer but for its seed, the store), and trains
each group as one program (fashion_sweep/packed.py). Each job is still run through
Hydra's own run_job, in order, so it keeps its `.hydra/` folder, its log and its
callbacks (the study records each trial's outcome as its job ends); the first job of
a pack trains the whole pack, the others return what it left for them.

Each member is an ordinary trial: its own MLflow run (params, per-epoch metrics,
config.yaml, model.pth), its own pruning, and its own failure (a bad value, a
divergence). With trainer.cuda_graph=true a pack's whole step is captured in one CUDA
graph. A job that cannot be packed (the torch loader, an optimizer without param
groups) runs on its own, as the basic launcher would run it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from fashion_sweep import packed, signals
from fashion_sweep.compose import plain
from fashion_sweep.config import ConfigError
from fashion_sweep.data import DataError, load_splits, make_loaders
from fashion_sweep.engine import DivergedError
from fashion_sweep.redaction import one_line

log = logging.getLogger(__name__)


@dataclass
class PackedLauncherConf:
    _target_: str = "fashion_sweep.packing.PackedLauncher"


ConfigStore.instance().store(
    group="hydra/launcher", name="packed", node=PackedLauncherConf, provider="fashion_sweep"
)


# torch.optim classes that take no per-parameter options (param groups): never packed
NO_GROUPS = {"torch.optim.LBFGS", "torch.optim.SparseAdam"}


def pack_key(cfg: DictConfig) -> str | None:
    """What the members of one pack must share, as a key; None for a job that cannot be
    packed (it runs on its own)."""
    from fashion_sweep.train import TARGETS, resolve_device

    target = cfg.optimizer._target_
    optimizer_ok = fnmatch(target, "torch.optim.*") and target not in NO_GROUPS
    if cfg.data.loader != "resident" or not optimizer_ok:
        return None
    if not any(fnmatch(cfg.model._target_, allowed) for allowed in TARGETS):
        return None
    try:
        device = str(resolve_device(cfg.trainer.device))  # auto and cpu may be one device
    except ConfigError:
        return None  # it fails on its own, as it would alone
    unused = {"num_workers", "download"}  # by the resident loader
    shared = {
        "model": cfg.model,
        "data": {k: v for k, v in cfg.data.items() if k not in unused},
        "optimizer": target,
        # cuda_graph included: a captured pack and an eager one are separate programs
        "trainer": {k: v for k, v in cfg.trainer.items() if k not in ("seed", "device")},
        "device": device,
        "store": [cfg.tracking.uri, cfg.tracking.experiment],
        "metric": cfg.optimized_metric,
    }
    return json.dumps(OmegaConf.to_container(OmegaConf.create(shared), resolve=True))


def task_config(config: DictConfig) -> DictConfig:
    """The job's config without its hydra node, as run_job hands it to the task; a copy
    of the task's part alone (1.0 ms a member here, where a deep copy of the whole
    config, the hydra node being most of it, took 6.4 ms)."""
    cfg = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
    OmegaConf.set_struct(cfg, OmegaConf.is_struct(config))
    OmegaConf.set_readonly(cfg, OmegaConf.is_readonly(config))
    # the values resolvers gave the job (${now:...}), as a deep copy would keep them
    OmegaConf.copy_cache(from_config=config, to_config=cfg)
    return cfg


class PackedLauncher(Launcher):
    def __init__(self) -> None:
        super().__init__()
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        self._configure_log()
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = []
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            config = self.hydra_context.config_loader.load_sweep_config(
                self.config, list(overrides)
            )
            with open_dict(config):
                config.hydra.job.id, config.hydra.job.num = str(idx), idx
            configs.append(config)
        packs: dict[str, list[DictConfig]] = {}
        for config in configs:
            if (key := pack_key(config)) is not None:
                packs.setdefault(key, []).append(config)
        pack_of = {c.hydra.job.num: members for members in packs.values() for c in members}
        log.info(
            f"Launching {len(configs)} jobs in this process, {len(packs)} pack(s) of "
            f"{', '.join(str(len(m)) for m in packs.values()) or 'none'}"
        )
        results: dict[int, Any] = {}

        def member(cfg: DictConfig) -> Any:
            """A packed job's task: its pack's first job trains them all."""
            from hydra.core.hydra_config import HydraConfig

            from fashion_sweep.train import settle_heap

            num = HydraConfig.get().job.num
            if num not in results:  # a pack trains once, whatever happens
                try:
                    results.update(train_pack(pack_of[num]))
                except Exception as error:  # not a member's own: every member's
                    error = error.with_traceback(None)  # not the pack's memory
                    results.update({c.hydra.job.num: error for c in pack_of[num]})
            settle_heap()  # as a trial of the basic launcher does (train.py)
            outcome = results.pop(num)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        returns = []
        for config in configs:
            shown = " ".join(filter_overrides(config.hydra.overrides.task))
            log.info(f"\t#{config.hydra.job.num} : {shown}")
            packed_job = config.hydra.job.num in pack_of
            returns.append(
                run_job(
                    hydra_context=self.hydra_context,
                    task_function=member if packed_job else self.task_function,
                    config=config,
                    job_dir_key="hydra.sweep.dir",
                    job_subdir_key="hydra.sweep.subdir",
                )
            )
            self._configure_log()
        return returns

    def _configure_log(self) -> None:
        configure_log(
            self.config.hydra.hydra_logging,
            self.config.hydra.verbose,
            execution_whitelist=self.hydra_context.execution_whitelist,
        )


def train_pack(configs: list[DictConfig]) -> dict[int, Any]:
    """Trains the jobs of one pack together; each job's outcome by its number: an
    Objective (train.py) or the exception it failed with."""
    from fashion_sweep.train import (
        SPLIT_TITLES,
        Objective,
        capturable,
        check,
        prepare,
        pruning,
        trainer_tags,
    )
    from fashion_sweep.writes import Writes  # MLflow: imported where a pack trains

    outcomes: dict[int, Any] = {}
    members: list[DictConfig] = []  # the task configs (no hydra node), as run_job makes them
    hydra_of: dict[int, DictConfig] = {}
    for config in configs:
        cfg = task_config(config)
        num = config.hydra.job.num
        try:
            device = check(cfg)  # one device for the pack: pack_key holds it
        except ConfigError as error:  # this member's values: it fails alone
            outcomes[num] = error.with_traceback(None)  # not the pack's memory
        else:
            members.append(cfg)
            hydra_of[id(cfg)] = config.hydra
    number = {id(cfg): hydra_of[id(cfg)].job.num for cfg in members}
    if not members:
        return outcomes
    first = members[0]
    try:
        prepare(first)
    except (ConfigError, DataError) as error:  # the data or the store: the whole pack
        error = error.with_traceback(None)
        return {**outcomes, **{number[id(cfg)]: error for cfg in members}}
    data = first.data
    splits = load_splits(data.root, data.train_size, data.val_size, data.test_size, data.split_seed)
    seeds = [cfg.trainer.seed for cfg in members]
    loaders = [
        make_loaders(splits, "resident", data.batch_size, device, data.shuffle, seed=seed)
        for seed in seeds
    ]
    models = []
    for cfg in members:
        torch.manual_seed(cfg.trainer.seed)
        models.append(instantiate(cfg.model, _execution_whitelist_=["fashion_sweep.model.*"]))
    options = []
    for cfg in members:
        kwargs = OmegaConf.to_container(cfg.optimizer, resolve=True)
        kwargs.pop("_target_")
        options.append({**kwargs, **capturable(cfg)})
    pack = packed.Pack(
        [m.to(device) for m in models],
        get_class(first.optimizer._target_),
        options,
        cuda_graph=first.trainer.cuda_graph,
    )
    tags = {"device": str(device), "pack": f"{len(members)} trials", **trainer_tags()}
    writes = Writes()  # the members' MLflow runs, written beside the training
    runs: list[Future] = []  # each member's MLflow run, as it opens
    active: list[int] = []  # the members whose run is open and unfinished
    done: dict[int, tuple[float, int | None]] = {}  # member -> its metric, pruned epoch
    train = (
        [m["train"] for m in loaders]
        if data.shuffle and len(set(seeds)) > 1
        else [loaders[0]["train"]]
    )
    metric = first.optimized_metric
    print(f"Packed {len(members)} trials: {', '.join(str(c.tracking.trial) for c in members)}")
    try:
        for i, cfg in enumerate(members):
            resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
            overrides = [plain(o) for o in hydra_of[id(cfg)].overrides.task]
            runs.append(writes.open(resolved, tags, overrides))
            active.append(i)
        prunes = [pruning(cfg, hydra_of[id(cfg)]) for cfg in members]
        for epoch in range(1, first.trainer.epochs + 1):
            start = time.perf_counter()
            losses = packed.train_epoch(train, pack, first.trainer.log_interval)
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            evaluated = {
                split: packed.evaluate(loaders[0][split], pack)
                for split in SPLIT_TITLES
                if split in loaders[0]
            }
            eval_seconds = time.perf_counter() - start
            last = epoch == first.trainer.epochs
            at = {member: position for position, member in enumerate(pack.ids)}
            for i in list(active):
                broken = writes.error(runs[i])  # its MLflow run (the store) failed it
                if i in pack.failed or broken is not None:
                    active.remove(i)  # first: an interruption from here on leaves it be
                    error = broken or DivergedError(pack.failed[i])
                    writes.end(runs[i], "FAILED", f"{type(error).__name__}: {one_line(error)}")
                    outcomes[number[id(members[i])]] = error.with_traceback(None)
                    continue
                metrics = {"train/loss": losses[at[i]]}
                for split, results in evaluated.items():
                    metrics[f"{split}/loss"] = results[at[i]]["loss"]
                    metrics[f"{split}/accuracy"] = results[at[i]]["accuracy"]
                metrics["perf/eval_seconds"] = eval_seconds / len(pack)
                metrics["perf/epoch_seconds"] = seconds / len(pack)
                metrics["perf/samples_per_second"] = (
                    len(splits["train"]) / metrics["perf/epoch_seconds"]
                )
                writes.log_metrics(runs[i], metrics, epoch)
                stop = prunes[i] is not None and prunes[i](epoch, metrics[metric], last)
                if stop or last:
                    if stop:
                        writes.mark_pruned(runs[i], epoch)
                    if members[i].tracking.log_model:
                        writes.save_model(runs[i], pack.state_dict(at[i]))
                    active.remove(i)  # first: an interruption from here on leaves it be
                    writes.end(runs[i], "FINISHED")
                    done[i] = (metrics[metric], epoch if stop else None)
            print(
                f"Epoch {epoch}: {len(active)} of {len(members)} trials train on "
                f"(the pack's epoch: {seconds:.2f} s training, {eval_seconds:.2f} s evaluation)"
            )
            if not active:
                break
            if len(active) < len(pack):  # pruned or failed members stop being computed
                pack.keep([at[i] for i in active])
                train = train if len(train) == 1 else [train[at[i]] for i in active]
                shown = ", ".join(str(members[i].tracking.trial) for i in active)
                print(f"The pack goes on with trials {shown}")
        writes.wait()  # every run ended in the store before any trial is recorded
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP: every open run KILLED
        for i in active:
            writes.end(runs[i], "KILLED", signals.reason(stop))
        writes.wait(abandon=True)  # a second interruption leaves what is queued
        raise
    except BaseException as error:
        for i in active:
            writes.end(runs[i], "FAILED", one_line(error))
        writes.wait(abandon=True)
        raise
    finally:
        writes.close()
    for i, (value, pruned) in done.items():
        num = number[id(members[i])]
        if (error := writes.error(runs[i])) is not None:  # its run was ended FAILED
            outcomes[num] = error.with_traceback(None)
        else:
            outcomes[num] = Objective(value, runs[i].result().info.run_id, pruned)
    return outcomes
