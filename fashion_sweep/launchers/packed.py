"""`hydra/launcher=packed`: the trials a sweep asks for at once, trained together.

`python -m fashion_sweep.train -m sweep=optuna hydra/launcher=packed
hydra.sweeper.n_jobs=32` hands the launcher 32 jobs at a time. It composes each job's
config, groups the jobs that share what a pack must share (the model, the data and its
loader, the optimizer's class, the trainer but for its seed, the store), and trains each
group as one program (core/stacked.py) through the run recipe (run.py).

With `hydra.launcher.mix_batch_sizes=true`, batch sizes that are all multiples of the
smallest (the preset's 32, 64, 128, 256) share a pack, trained in micro-batches of the
smallest (each member steps once its own batch is complete): fewer, fuller packs. A
batch size that is not a multiple goes to a pack of its own, and so does each batch
size with trainer.cuda_graph=true (one captured step: one shape). Off by default: on a
CPU a member of batch size 256 computes in eight micro-batches of 32 what it computed
in one, and the 64-trial sweep of docs/performance.md trained 1.9x as long mixed. Each job
is still run through Hydra's own run_job, in order, so it keeps its `.hydra/` folder,
its log and its callbacks (the study records each trial's outcome as its job ends); the
first job of a pack trains the whole pack, the others return what it left for them.

Each member is an ordinary trial: its own MLflow run (params, per-epoch metrics,
config.yaml, model.pth), its own pruning, and its own failure (a bad value, a
divergence). With trainer.cuda_graph=true a pack's whole step is captured in one CUDA
graph. A job that cannot be packed (the torch loader, an optimizer without param
groups) runs on its own, as the basic launcher would run it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict

from fashion_sweep.config import ConfigError, plain
from fashion_sweep.core import stacked
from fashion_sweep.core.data import DataError, load_splits, make_loaders
from fashion_sweep.preflight import TARGETS, check, prepare, resolve_device
from fashion_sweep.run import (
    SPLIT_TITLES,
    Member,
    Objective,
    build_model,
    capturable,
    run_epochs,
    settle_heap,
    trainer_tags,
)
from fashion_sweep.sweeps import trial_output

log = logging.getLogger(__name__)


@dataclass
class PackedLauncherConf:
    _target_: str = "fashion_sweep.launchers.packed.PackedLauncher"
    # members of different batch sizes (each a multiple of the smallest) in one pack,
    # in micro-batches of the smallest; off: one pack per batch size
    mix_batch_sizes: bool = False


ConfigStore.instance().store(
    group="hydra/launcher", name="packed", node=PackedLauncherConf, provider="fashion_sweep"
)


# torch.optim classes that take no per-parameter options (param groups): never packed
NO_GROUPS = {"torch.optim.LBFGS", "torch.optim.SparseAdam"}


def pack_key(cfg: DictConfig, mix_batch_sizes: bool = False) -> str | None:
    """What the members of one pack must share, as a key; None for a job that cannot be
    packed (it runs on its own). With `mix_batch_sizes`, not the batch size (uncaptured:
    by_batch_size then splits the jobs of one key)."""
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
    if mix_batch_sizes and not cfg.trainer.cuda_graph:
        unused.add("batch_size")
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


def by_batch_size(configs: list[DictConfig]) -> list[list[DictConfig]]:
    """Jobs of one pack key split into packs whose batch sizes are each a multiple of
    the pack's smallest: the micro-batch all its members train in."""
    groups: dict[int, list[DictConfig]] = {}  # smallest batch size -> its pack
    for config in sorted(configs, key=lambda c: c.data.batch_size):
        size = config.data.batch_size
        smallest = next((s for s in groups if size % s == 0), size)
        groups.setdefault(smallest, []).append(config)
    return [sorted(group, key=lambda c: c.hydra.job.num) for group in groups.values()]


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
    def __init__(self, mix_batch_sizes: bool = False) -> None:
        super().__init__()
        self.mix_batch_sizes = mix_batch_sizes
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
        configs = [
            self._job_config(list(overrides), idx)
            for idx, overrides in enumerate(job_overrides, initial_job_idx)
        ]
        by_key: dict[str, list[DictConfig]] = {}
        for config in configs:
            if (key := pack_key(config, self.mix_batch_sizes)) is not None:
                by_key.setdefault(key, []).append(config)
        packs = {
            f"{key}/{n}": pack
            for key, jobs in by_key.items()
            for n, pack in enumerate(by_batch_size(jobs))
        }
        log.info(
            f"Launching {len(configs)} jobs in this process, {len(packs)} pack(s) of "
            f"{', '.join(str(len(m)) for m in packs.values()) or 'none'}"
        )
        packed_task = PackedJobs(packs.values())
        returns = []
        for config in configs:
            shown = " ".join(filter_overrides(config.hydra.overrides.task))
            log.info(f"\t#{config.hydra.job.num} : {shown}")
            packed_job = config.hydra.job.num in packed_task.pack_of
            returns.append(
                run_job(
                    hydra_context=self.hydra_context,
                    task_function=packed_task if packed_job else self.task_function,
                    config=config,
                    job_dir_key="hydra.sweep.dir",
                    job_subdir_key="hydra.sweep.subdir",
                )
            )
            self._configure_log()
        return returns

    def _job_config(self, overrides: list[str], idx: int) -> DictConfig:
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id, config.hydra.job.num = str(idx), idx
        return config

    def _configure_log(self) -> None:
        configure_log(
            self.config.hydra.hydra_logging,
            self.config.hydra.verbose,
            execution_whitelist=self.hydra_context.execution_whitelist,
        )


class PackedJobs:
    """The task function of a packed job: its pack's first job trains them all, and each
    job returns (or raises) its own member's outcome."""

    def __init__(self, packs: Iterable[list[DictConfig]]) -> None:
        self.pack_of = {c.hydra.job.num: members for members in packs for c in members}
        self.results: dict[int, Any] = {}

    def __call__(self, cfg: DictConfig) -> Any:
        from hydra.core.hydra_config import HydraConfig

        num = HydraConfig.get().job.num
        if num not in self.results:  # a pack trains once, whatever happens
            members = self.pack_of[num]
            try:
                with _output(members):
                    self.results.update(train_pack(members))
            except Exception as error:  # not a member's own: every member's
                error = error.with_traceback(None)  # not the pack's memory
                self.results.update({c.hydra.job.num: error for c in self.pack_of[num]})
            settle_heap()  # once a pack, as once a trial of the basic launcher (run.py)
        outcome = self.results.pop(num)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def _output(members: list[DictConfig]) -> contextlib.AbstractContextManager:
    """A pack's output, in each member's log file (sweeps/trial_output.py)."""
    if not trial_output.wanted(members[0], members[0].hydra):
        return contextlib.nullcontext()
    names = ", ".join(str(m.tracking.run_name) for m in members)
    return trial_output.to_files([m.hydra for m in members], f"# a pack of {names}")


class Packed:
    """A pack's program for run.run_epochs: the members' models stacked
    (core/stacked.py), one loader per member where their data orders differ."""

    def __init__(
        self,
        pack: stacked.Pack,
        loaders: list[dict],
        members: list[DictConfig],
        evaluation: list[dict] | None = None,
    ):
        """`loaders`: each member's (of the pack's micro-batch size, where the batch
        sizes differ); `evaluation`: then, each member's of its own batch size."""
        data = members[0].data
        seeds = {cfg.trainer.seed for cfg in members}
        self.pack, self.test_loaders = pack, loaders[0]
        self.own = evaluation  # None: the members' batch sizes are one
        self.train = [m["train"] for m in loaders] if data.shuffle and len(seeds) > 1 else []
        self.shared = loaders[0]["train"]
        self.trials = [cfg.tracking.trial for cfg in members]
        self.log_interval = members[0].trainer.log_interval
        self.splits = [split for split in SPLIT_TITLES if split in loaders[0]]
        self.train_images = len(self.shared.dataset)

    @property
    def ids(self) -> list[int]:
        return self.pack.ids

    @property
    def failed(self) -> dict[int, BaseException]:
        return self.pack.failed

    def train_epoch(self, epoch: int) -> list[float]:
        return stacked.train_epoch(self.train or [self.shared], self.pack, self.log_interval)

    def evaluate(self, split: str) -> list[dict[str, float]]:
        if self.own is not None:
            return stacked.evaluate([own[split] for own in self.own], self.pack)
        return stacked.evaluate(self.test_loaders[split], self.pack)

    def state_dict(self, position: int) -> dict[str, Any]:
        return self.pack.state_dict(position)

    def keep(self, positions: list[int]) -> None:
        """The pack goes on with these members alone (their data orders with them)."""
        self.pack.keep(positions)
        self.train = [self.train[p] for p in positions] if self.train else []
        self.own = [self.own[p] for p in positions] if self.own is not None else None
        shown = ", ".join(str(self.trials[number]) for number in self.pack.ids)
        print(f"The pack goes on with trials {shown}")

    def pruned(self, number: int, epoch: int, metric: str) -> None:
        pass  # the sweep's log says so, trial by trial

    def epoch_done(self, epoch: int, active: int, seconds: float, eval_seconds: float) -> None:
        print(
            f"Epoch {epoch}: {active} of {len(self.trials)} trials train on "
            f"(the pack's epoch: {seconds:.2f} s training, {eval_seconds:.2f} s evaluation)"
        )


def train_pack(configs: list[DictConfig]) -> dict[int, Any]:
    """Trains the jobs of one pack together; each job's outcome by its number: an
    Objective or the exception it failed with."""
    from fashion_sweep.sweeps.pruning import ended_elsewhere, pruning
    from fashion_sweep.tracking.writer import Writer  # MLflow: imported where a pack trains

    outcomes: dict[int, Any] = {}
    members: list[Member] = []  # task configs (no hydra node), as run_job makes them
    numbers: list[int] = []
    for config in configs:
        cfg = task_config(config)
        try:
            device = check(cfg)  # one device for the pack: pack_key holds it
        except ConfigError as error:  # this member's values: it fails alone
            outcomes[config.hydra.job.num] = error.with_traceback(None)  # not the pack's memory
            continue
        overrides = [plain(line) for line in config.hydra.overrides.task]
        prune, ended = pruning(cfg, config.hydra), ended_elsewhere(cfg, config.hydra)
        members.append(Member(cfg, overrides, prune, ended))
        numbers.append(config.hydra.job.num)
    if not members:
        return outcomes
    first = members[0].cfg
    try:
        prepare(first)
    except (ConfigError, DataError) as error:  # the data or the store: the whole pack
        return {**outcomes, **dict.fromkeys(numbers, error.with_traceback(None))}
    pack, loaders, evaluation = _build(members, device)
    program = Packed(pack, loaders, [m.cfg for m in members], evaluation)
    trials = ", ".join(str(m.cfg.tracking.trial) for m in members)
    sizes = sorted({m.cfg.data.batch_size for m in members})
    micro = f" (batch sizes {', '.join(map(str, sizes))}, in micro-batches of {sizes[0]})"
    print(f"Packed {len(members)} trials: {trials}{micro if len(sizes) > 1 else ''}")
    writer = Writer()  # the members' MLflow runs, written beside the training
    tags = {**trainer_tags(device), "pack": f"{len(members)} trials: {trials}"}
    try:
        done = run_epochs(program, members, writer, tags)
    finally:
        writer.close()
    metric = first.optimized_metric
    for number, outcome in done.items():
        result = outcome if isinstance(outcome, BaseException) else Objective.of(outcome, metric)
        outcomes[numbers[number]] = result
    return outcomes


def _build(
    members: list[Member], device: Any
) -> tuple[stacked.Pack, list[dict], list[dict] | None]:
    """The members' models, each seeded as its trial alone seeds it, stacked into one
    pack with one param group each; one set of loaders per member's seed, of the pack's
    smallest batch size; where the batch sizes differ, each member's own for evaluation."""
    data = members[0].cfg.data
    splits = load_splits(data.root, data.train_size, data.val_size, data.test_size, data.split_seed)
    sizes = [member.cfg.data.batch_size for member in members]
    micro = min(sizes)
    loaders, evaluation, models, options = [], [], [], []
    for member in members:
        cfg = member.cfg
        seed = cfg.trainer.seed
        loaders.append(make_loaders(splits, "resident", micro, device, data.shuffle, seed=seed))
        if len(set(sizes)) > 1:  # the tutorial's test loss is a mean over batches
            evaluation.append(
                make_loaders(splits, "resident", cfg.data.batch_size, device, False, seed=seed)
            )
        models.append(build_model(cfg, device))
        kwargs = OmegaConf.to_container(cfg.optimizer, resolve=True)
        kwargs.pop("_target_")
        options.append({**kwargs, **capturable(cfg)})
    first = members[0].cfg
    optimizer = get_class(first.optimizer._target_)
    pack = stacked.Pack(models, optimizer, options, first.trainer.cuda_graph, sizes)
    return pack, loaders, evaluation or None
