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
import functools
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from fashion_sweep.config import ConfigError
from fashion_sweep.sweeps import trial_output
from fashion_sweep.tracking.redaction import one_line

log = logging.getLogger(__name__)


@dataclass
class PackedLauncherConf:
    _target_: str = "fashion_sweep.launchers.packed.PackedLauncher"
    # members of different batch sizes (each a multiple of the smallest) in one pack,
    # in micro-batches of the smallest; off: one pack per batch size
    mix_batch_sizes: bool = False
    # a pack takes the sweep's next trials as its members end (at an epoch's end), so it
    # stays full while the study has trials to ask; off: a batch of n_jobs trials at a
    # time, each pack waited for whole
    continuous: bool = True


ConfigStore.instance().store(
    group="hydra/launcher", name="packed", node=PackedLauncherConf, provider="fashion_sweep"
)


# more(jobs run since the last call: (job number, its return), whether to ask) -> the
# next jobs, (overrides, job number): the sweeper's side of launch_stream (slots.Stream)
More = Callable[[list[tuple[int, JobReturn]], bool], list[tuple[Sequence[str], int]]]
Returns = list[tuple[int, JobReturn]]

# torch.optim classes that take no per-parameter options (param groups): never packed
NO_GROUPS = {"torch.optim.LBFGS", "torch.optim.SparseAdam"}


def pack_key(cfg: DictConfig, mix_batch_sizes: bool = False) -> str | None:
    """What the members of one pack must share, as a key; None for a job that cannot be
    packed (it runs on its own). With `mix_batch_sizes`, not the batch size (uncaptured:
    by_batch_size then splits the jobs of one key)."""
    from fashion_sweep.preflight import TARGETS, resolve_device  # torch: not at discovery

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
    def __init__(self, mix_batch_sizes: bool = False, continuous: bool = True) -> None:
        super().__init__()
        self.mix_batch_sizes, self.continuous = mix_batch_sizes, continuous
        self.handed: list[tuple[int, JobReturn]] = []  # jobs run, not yet handed back
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

    def launch_stream(self, jobs: Sequence[tuple[Sequence[str], int]], more: More) -> Returns:
        """Our own interface (sweeps/slots.py, Stream), where hydra.launcher.continuous:
        `jobs` (overrides, job number) trained in packs that take the sweep's next jobs
        as members end. After each epoch in which members ended, their Hydra jobs are
        run (each returns its member's outcome, so its study records it) and handed to
        `more`, with whether it may ask for more; the jobs it returns join the pack, or
        wait for a pack of their own where they cannot (another pack key, a batch size
        the pack's micro-batch does not divide), and while one waits the pack takes no
        more. A job that cannot be packed runs alone. Returns what is left to hand back
        when the last pack has ended."""
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        self._configure_log()
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        waiting = [self._job_config(list(overrides), idx) for overrides, idx in jobs]
        keys = {c.hydra.job.num: pack_key(c, self.mix_batch_sizes) for c in waiting}
        while waiting:
            config = waiting.pop(0)
            self._show(config)
            if (key := keys[config.hydra.job.num]) is None:
                self._run(config, self.task_function)
                continue
            same = [c for c in waiting if keys[c.hydra.job.num] == key]
            pack = next(p for p in by_batch_size([config, *same]) if any(c is config for c in p))
            waiting = [c for c in waiting if not any(c is m for m in pack)]
            for member in pack[1:]:
                self._show(member)
            self._stream(pack, key, waiting, keys, more)
        handed, self.handed = self.handed, []
        return handed

    def _stream(
        self, pack: list[DictConfig], key: str, waiting: list, keys: dict, more: More
    ) -> None:
        """Trains one continuous pack; its jobs' outcomes in self.handed. `keys`: each
        job's pack key by its number, the joiners' added."""
        from fashion_sweep.launchers.pack import train_pack
        from fashion_sweep.run import settle_heap

        jobs = {config.hydra.job.num: config for config in pack}
        micro = min(config.data.batch_size for config in pack)
        left = set(jobs)  # not yet run as Hydra jobs

        def join(outcomes: dict[int, Any]) -> list[DictConfig]:
            self._report(outcomes, jobs, left, files)
            handed, self.handed = self.handed, []
            try:
                nexts = more(handed, not waiting)
            except BaseException as error:  # the sweep's (too many failures), not the pack's
                stopped.append(error)
                raise
            joined = []
            for overrides, idx in nexts:
                config = self._job_config(list(overrides), idx)
                self._show(config)
                keys[idx] = pack_key(config, self.mix_batch_sizes)
                fits = keys[idx] == key
                if not waiting and fits and config.data.batch_size % micro == 0:
                    joined.append(config)
                    jobs[idx] = config
                    left.add(idx)
                else:
                    waiting.append(config)  # the next pack's: this one takes no more
            if files is not None and joined:
                names = ", ".join(str(c.tracking.run_name) for c in joined)
                files.add([c.hydra for c in joined], f"# {names}, joining a pack")
            return joined

        files, stopped = None, []
        try:
            with _output(pack) as files:  # its traceback in the logs of those still here
                outcomes = train_pack(pack, join)
        except Exception as error:  # not a member's own: every member's still here
            if error in stopped:  # their runs KILLED: the sweep cuts their trials off
                raise
            outcomes = dict.fromkeys(left, error.with_traceback(None))
        self._report(outcomes, jobs, left, None)
        settle_heap()  # once a pack, as once a trial of the basic launcher (run.py)

    def _report(
        self, outcomes: dict[int, Any], jobs: dict[int, DictConfig], left: set, files: Any
    ) -> None:
        """Runs the Hydra jobs of members that ended, each returning (or raising) its
        outcome, so that Hydra's callbacks (the study's record) see it as they see any
        job's; their log files leave the pack's output."""
        if files is not None:  # its log ends with its trial
            files.drop([jobs[number].hydra for number in outcomes])
        for number, outcome in outcomes.items():  # and says why it failed
            job = jobs[number]
            if isinstance(outcome, BaseException) and trial_output.wanted(job, job.hydra):
                trial_output.note(job.hydra, f"Job failed: {one_line(outcome)}")
        for number, outcome in outcomes.items():
            job = jobs[number]
            left.discard(number)
            # with trial_output=file, logging stays the pack's: a member's records went to
            # its file as it trained; else Hydra's job log, as for any job
            to_file = trial_output.wanted(job, job.hydra)
            self._run(job, functools.partial(_returns, outcome), configure_log=not to_file)

    def _run(self, config: DictConfig, task: TaskFunction, configure_log: bool = True) -> None:
        returned = run_job(
            hydra_context=self.hydra_context,
            task_function=task,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
            configure_logging=configure_log,
        )
        self.handed.append((config.hydra.job.num, returned))
        if configure_log:
            self._configure_log()

    def _show(self, config: DictConfig) -> None:
        shown = " ".join(filter_overrides(config.hydra.overrides.task))
        log.info(f"\t#{config.hydra.job.num} : {shown}")

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

        from fashion_sweep.launchers.pack import train_pack
        from fashion_sweep.run import settle_heap

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


def _returns(outcome: Any, cfg: DictConfig) -> Any:
    """The task of a continuous pack's job: its member's outcome, returned or raised."""
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _output(members: list[DictConfig]) -> contextlib.AbstractContextManager:
    """A pack's output, in each member's log file (sweeps/trial_output.py)."""
    if not trial_output.wanted(members[0], members[0].hydra):
        return contextlib.nullcontext()
    names = ", ".join(str(m.tracking.run_name) for m in members)
    return trial_output.to_files([m.hydra for m in members], f"# a pack of {names}")
