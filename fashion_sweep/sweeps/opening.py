"""What one worker's sweep opens before its first trial, in order: the search space and
the sampler (checked before any store opens), a trial's config checked as a run would
check it, the study (created, or joined and held to its definition), this worker's
sweep folder, and the study's MLflow parent run. `open_sweep` returns all of it as one
`Opened`; the loop (loop.py) reads it and changes none of it."""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, read_write

from fashion_sweep.config import ConfigError
from fashion_sweep.core.data import DataError
from fashion_sweep.sweeps import sampler, space, study, workers
from fashion_sweep.sweeps.compose import ComposeOnce
from fashion_sweep.sweeps.schedule import tally
from fashion_sweep.sweeps.settings import Settings, SweepError
from fashion_sweep.tracking import stores, sweep_runs
from fashion_sweep.tracking.names import to_mlflow
from fashion_sweep.tracking.redaction import mask_log_records, redact

log = logging.getLogger(__name__)
PARENT_RUN = "mlflow_parent_run_id"  # study user attr


@dataclass(frozen=True)
class Opened:
    space: space.Space
    points: list[dict[str, Any]] | None  # every configuration of a finite space
    extend: Callable[..., Any] | None  # hydra.sweeper.custom_search_space's function
    n_trials: int  # the settings' n_trials, or fewer: a finite space's configurations
    metric: str
    name: str  # the study's
    where: Any  # its storage, as the study reads it (with Optuna's cache, for a database)
    study: optuna.Study
    study_id: int
    sweep_dir: str  # this worker's
    parent: str  # the MLflow parent run's id
    n_asked: int  # hydra.sweeper.n_trials

    @property
    def used_up(self) -> bool:
        """The search space holds fewer configurations than n_trials asked for: the
        sweep ends when each has run once (a repeat would be the same trial, seed and
        all: a seed searched, `trainer.seed=choice(0,1,2)`, gives repeats)."""
        return self.n_trials < self.n_asked

    def all_run(self) -> str:
        """What a used-up space has run: `its 2 configurations have all run (...)`."""
        them = (
            "configuration has"
            if self.n_trials == 1
            else f"{self.n_trials} configurations have all"
        )
        return f"its {them} run (hydra.sweeper.n_trials={self.n_asked} asked for more)"

    def why_ended(self) -> str:
        """Why a sweep that ran all it could ended, for optimization_results.yaml."""
        if self.used_up:
            return f"the search space is used up: {self.all_run()}"
        return f"hydra.sweeper.n_trials={self.n_trials} trials finished"


def open_sweep(
    settings: Settings,
    config: DictConfig,
    compose: ComposeOnce,
    arguments: list[str],
    on_stale: Callable[[optuna.Study, Any], None],
) -> Opened:
    """Opens what the sweep needs; `on_stale` is told of each trial Optuna fails because
    its heartbeat stopped. Raises SweepError for what a user must change."""
    mask_log_records()  # the launchers log each job's overrides, URIs and all
    params = [f"{k}={v}" for k, v in (settings.params or {}).items()]
    searched = space.parse(params + arguments, config)
    extend = _extender(settings.custom_search_space)
    chosen = sampler.make_sampler(settings.sampler, searched.searched)
    # a finite space is run once, point by point; one a custom_search_space extends is not
    # known here
    size = space.size(searched.searched) if extend is None else None
    n_trials = min(settings.n_trials, size or settings.n_trials)
    check_storage(settings.storage, config.tracking.uri)
    preflight(config, compose, searched)
    metric = config.optimized_metric
    direction = space.direction(settings.direction, metric)
    defined = study.definition(
        config,
        searched.searched,
        searched.fixed,
        settings.sampler,
        metric,
        direction,
        settings.custom_search_space,
        settings.pruner if settings.prunes else None,
    )
    name = settings.study_name or study.default_name(defined)
    try:
        database = study.storage(
            settings.storage, settings.heartbeat_interval, settings.grace_period, on_stale
        )
        where = optuna.storages.get_storage(database)  # with Optuna's cache of finished trials
        pruner = settings.make_pruner()  # TPE samples Hyperband's brackets apart
        held, created = study.open_study(name, where, chosen, direction, pruner)
        study.check_definition(held, defined, created)
        study.name_metric(held, metric)
    except study.StudyError as error:
        raise SweepError(str(error)) from None
    sweep_dir = claim_sweep_dir(config, compose)
    shown = redact(settings.storage) if settings.storage else "memory"
    tags = {
        "optuna.study_name": name,
        "optuna.storage": shown,
        "optuna.n_trials": str(n_trials),
        "optuna.direction": direction,
        "optimized_metric": metric,
        "sweep_dir": str(Path(sweep_dir).resolve()),
    }
    parent = parent_run(held, created, config, f"{name} ({n_trials} trials)", tags, searched)
    try:
        sweep_runs.share_view(parent, metric, direction == "maximize", list(searched.searched))
    except BaseException as error:  # the parent is not left RUNNING
        sweep_runs.close_sweep_run(parent, error)
        raise
    counted = len(tally(held.get_trials(deepcopy=False)).counted)
    fewer = (
        f" (all the search space holds; hydra.sweeper.n_trials={settings.n_trials} asked for more)"
        if n_trials < settings.n_trials
        else ""
    )
    log.info(
        f"Study {name!r} in {shown}: {counted} of {n_trials} trials finished{fewer}; this "
        f"worker ({workers.me()['id']}) runs up to {settings.n_jobs} at a time"
    )
    study_id = where.get_study_id_from_name(name)
    return Opened(
        searched, space.points(searched.searched) if extend is None else None, extend,
        n_trials, metric, name, where,
        held, study_id, sweep_dir, parent, settings.n_trials,
    )  # fmt: skip


def check_storage(storage: str | None, tracking_uri: str) -> None:
    """The study's database checked as MLflow's store is (tracking/stores.py): usable,
    and not MLflow's; before either is written, so a sweep that cannot open its study
    leaves no mlflow.db behind."""
    if storage is None:
        return  # in memory
    try:
        stores.check("hydra.sweeper.storage", storage, tool="optuna")
    except stores.StoreError as error:
        raise SweepError(str(error)) from None
    with contextlib.suppress(ValueError):  # a tracking.uri that is no address: preflight's
        if stores.absolute(storage) == stores.absolute(tracking_uri):
            raise SweepError(
                f"hydra.sweeper.storage and tracking.uri both name {redact(storage)}: Optuna "
                "and MLflow each need a database of their own (sqlite:///optuna.db)"
            )


def preflight(config: DictConfig, compose: ComposeOnce, searched: space.Space) -> None:
    """A trial's config, checked before any store opens (preflight.check, then prepare,
    which also sets up the MLflow store and the data on first use): a value no trial
    can run with is refused now, not trial after trial. What depends on the trial's
    own values (a learning rate the space allows) is left to the trial."""
    from fashion_sweep.preflight import check, prepare

    point = {name: space.some_value(d) for name, d in searched.searched.items()}
    lines = [f"{k}={v}" for k, v in {**point, **searched.fixed}.items()]
    try:
        trial_config = compose.load_sweep_config(config, [*lines, *searched.fixed_overrides])
    except HydraException:
        return  # this point does not compose (a group's own keys): each trial says so
    try:
        check(trial_config, try_step=False)  # a trial takes check()'s step where it trains
        prepare(trial_config)
    except ConfigError as error:
        if not space.related(error.keys, searched.searched):
            raise SweepError(str(error)) from None
    except DataError as error:
        raise SweepError(str(error)) from None


def _extender(name: str | None) -> Callable[..., Any] | None:
    """hydra-optuna-sweeper's custom_search_space: a function the sweep's config names
    to suggest more parameters per trial; None if there is none."""
    if not name:
        return None
    try:  # the sweep's own config names it, as the plugin lets it
        return instantiate({"_target_": name, "_partial_": True}, _execution_whitelist_=name)
    except Exception as error:
        raise SweepError(f"hydra.sweeper.custom_search_space={name}: {error}") from None


def claim_sweep_dir(config: DictConfig, compose: ComposeOnce) -> str:
    """This worker's own sweep folder: Hydra's, or with `-1`, `-2`, ... added when
    another worker started in the same second. Set into the sweep's config (which the
    launcher reads) and into every job's (composed by `compose`). Trial folders are
    trial numbers."""
    base = Path(str(config.hydra.sweep.dir))
    for n in itertools.count():
        path = base if n == 0 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir(parents=True)
            break
        except FileExistsError:
            continue
    with read_write(config.hydra.sweep):
        config.hydra.sweep.dir = str(path)
    compose.sweep_dir = str(path)
    return str(path)


def parent_run(
    held: optuna.Study,
    created: bool,
    config: DictConfig,
    name: str,
    tags: dict[str, str],
    searched: space.Space,
) -> str:
    """The study's MLflow parent run, made by the worker that created the study and
    kept in the study (user attr), so every worker and every resume finds it; its
    params what the trials compute (the space, and the fixed values not of runtime),
    the space also as tags."""
    tags = {**tags, **{f"space.{to_mlflow(k)}": str(v) for k, v in searched.searched.items()}}
    params = {
        **{to_mlflow(key): space.describe(d) for key, d in searched.searched.items()},
        **{
            to_mlflow(key): redact(str(v))
            for key, v in searched.fixed.items()
            if study.computed(key)
        },
    }
    parent = held.user_attrs.get(PARENT_RUN)
    for _ in range(0 if created else 60):  # the creator is making it: wait a little
        if parent:
            break
        time.sleep(0.5)
        parent = held.user_attrs.get(PARENT_RUN)
    tracking = config.tracking
    run_id = sweep_runs.open_sweep_run(
        tracking.uri, tracking.experiment, name, tags, parent, params
    )
    if run_id != parent:
        held.set_user_attr(PARENT_RUN, run_id)
    return run_id
