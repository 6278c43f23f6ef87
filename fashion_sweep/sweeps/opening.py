"""What one worker's sweep opens before its first trial, in order: the search space and
the sampler (checked before any store opens), a trial's config checked as a run would
check it, the study (created, or joined and held to its definition), this worker's
sweep folder, and the study's MLflow parent run. `open_sweep` returns all of it as one
`Opened`; the loop (loop.py) reads it and changes none of it."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
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
from fashion_sweep.sweeps import apps, sampler, space, study, workers
from fashion_sweep.sweeps.compose import ComposeOnce
from fashion_sweep.sweeps.schedule import tally
from fashion_sweep.sweeps.settings import Settings, SweepError
from fashion_sweep.tracking import stores, sweep_runs
from fashion_sweep.tracking.names import to_mlflow
from fashion_sweep.tracking.redaction import mask_log_records, redact

log = logging.getLogger(__name__)
PARENT_RUN = "mlflow_parent_run_id"  # study user attr
CLAIM = ".worker"  # in a worker's sweep folder while it runs (claim_sweep_dir)


@dataclass(frozen=True)
class Opened:
    space: space.Space
    points: list[dict[str, Any]] | None  # every configuration of a finite space
    extend: Callable[..., Any] | None  # hydra.sweeper.custom_search_space's function
    n_trials: int  # the settings' n_trials, or fewer: a finite space's configurations
    metrics: list[str]  # the names of a trial's values, one per direction
    directions: list[str]
    name: str  # the study's
    where: Any  # its storage, as the study reads it (with Optuna's cache, for a database)
    study: optuna.Study
    study_id: int
    sweep_dir: str  # this worker's
    parent: str | None  # the MLflow parent run's id; None for an app without runs
    n_asked: int  # hydra.sweeper.n_trials
    app: apps.App

    @property
    def metric(self) -> str:
        """The metric a single-objective sweep optimizes (the first of several)."""
        return self.metrics[0]

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1

    @property
    def maximize(self) -> bool:
        return self.directions[0] == "maximize"

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
    app = apps.make(settings.app, config)
    check_storage(settings.storage, app.tracking_uri)
    app.check(compose, searched)
    named = app.metrics()
    direction = space.directions(settings.direction, named, app.direction)
    metrics = named or (
        ["value"] if len(direction) == 1 else [f"value_{i}" for i in range(len(direction))]
    )
    check_objectives(settings, metrics, app)
    defined = study.definition(
        config,
        searched.searched,
        searched.fixed,
        settings.sampler,
        metrics,
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
        study.name_metric(held, metrics)
    except study.StudyError as error:
        raise SweepError(str(error)) from None
    sweep_dir = claim_sweep_dir(config, compose)
    shown = redact(settings.storage) if settings.storage else "memory"
    tags = {
        "optuna.study_name": name,
        "optuna.storage": shown,
        "optuna.n_trials": str(n_trials),
        "optuna.direction": ",".join(direction),
        "optimized_metric": ",".join(metrics),
        "sweep_dir": str(Path(sweep_dir).resolve()),
    }
    parent = None
    try:
        if app.tracking_uri is not None:
            parent = parent_run(held, created, app, f"{name} ({n_trials} trials)", tags, searched)
            sweep_runs.share_view(
                parent, metrics[0], direction[0] == "maximize", list(searched.searched)
            )
    except BaseException as error:  # the parent is not left RUNNING, the folder not held
        release(sweep_dir)
        if parent is not None:
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
        n_trials, metrics, direction, name, where,
        held, study_id, sweep_dir, parent, settings.n_trials, app,
    )  # fmt: skip


def check_objectives(settings: Settings, metrics: list[str], app: apps.App) -> None:
    """What a multi-objective sweep cannot do, and confirmation without a seed, in one
    line each."""
    if len(metrics) > 1 and settings.prunes:
        raise SweepError(
            f"hydra.sweeper.pruner: Optuna cannot prune a multi-objective study "
            f"({', '.join(metrics)}); use hydra/sweeper/pruner=none"
        )
    if len(metrics) > 1 and settings.top_k:
        raise SweepError(
            "hydra.sweeper.confirm.top_k: a multi-objective study has a Pareto front, not "
            "a top k; set it to 0"
        )
    key = app.seed_key(settings.confirm)
    if settings.top_k and not key:
        raise SweepError(
            "hydra.sweeper.confirm.seed_key: name the key the app seeds its runs with "
            "(e.g. seed), which each confirmation run gets anew"
        )
    if settings.top_k and not space.exists(app.config, key):
        raise SweepError(f"hydra.sweeper.confirm.seed_key={key} is not a key of the config")


def check_storage(storage: str | None, tracking_uri: str | None) -> None:
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
        if tracking_uri is not None and stores.absolute(storage) == stores.absolute(tracking_uri):
            raise SweepError(
                f"hydra.sweeper.storage and tracking.uri both name {redact(storage)}: Optuna "
                "and MLflow each need a database of their own (sqlite:///optuna.db)"
            )


def preflight(config: DictConfig, compose: ComposeOnce, searched: space.Space) -> None:
    """A trial's config, checked before any store opens (preflight.check, then prepare,
    which also sets up the MLflow store and the data on first use): a value no trial
    can run with is refused now, not trial after trial. What depends on the trial's
    own values (a learning rate the space allows) is left to the trial."""
    from fashion_sweep.core.data import DataError  # torch: this app's sweeps alone
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
    """This worker's own sweep folder: Hydra's (made, or found as a fixed
    hydra.sweep.dir), or with `-1`, `-2`, ... added while another worker runs in it
    (one that started in the same second). A worker claims its folder with a file
    (CLAIM) made only where there is none, and `release` removes it as the sweep ends;
    one a worker killed -9 left is taken over once that worker is provably gone. Set
    into the
    sweep's config (which the launcher reads) and into every job's (composed by
    `compose`)."""
    base = Path(str(config.hydra.sweep.dir))
    for n in itertools.count():
        path = base if n == 0 else base.with_name(f"{base.name}-{n}")
        path.mkdir(parents=True, exist_ok=True)
        if _claim(path / CLAIM):
            break
    with read_write(config.hydra.sweep):
        config.hydra.sweep.dir = str(path)
    compose.sweep_dir = str(path)
    return str(path)


def _claim(file: Path) -> bool:
    """Whether this worker now holds `file`: made here, or taken over from a worker that
    is provably gone (workers.alive), which one of several resumes does."""
    for _ in range(2):
        try:
            with open(file, "x") as claim:
                claim.write(json.dumps(workers.me()))
            return True
        except FileExistsError:
            pass
        try:
            holder = json.loads(file.read_text())
        except (OSError, ValueError):  # being written this moment: another's
            return False
        if workers.alive(holder) is not False:
            return False
        try:  # the rename is atomic: only one worker takes it over
            taken = file.with_name(f"{CLAIM}.{os.getpid()}.gone")
            os.rename(file, taken)
            taken.unlink()
        except FileNotFoundError:
            return False
    return False


def release(sweep_dir: str) -> None:
    """Gives up this worker's sweep folder (claim_sweep_dir): a later run may use it."""
    with contextlib.suppress(OSError):
        Path(sweep_dir, CLAIM).unlink()


def parent_run(
    held: optuna.Study,
    created: bool,
    app: apps.App,
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
    run_id = sweep_runs.open_sweep_run(
        str(app.tracking_uri), app.experiment, name, tags, parent, params
    )
    if run_id != parent:
        held.set_user_attr(PARENT_RUN, run_id)
    return run_id
