"""hydra-optuna-sweeper's sweeper, made resumable, tolerant of bad trials, and tracked.

Selected by conf/sweep/optuna.yaml (`hydra.sweeper._target_`), registered with Hydra
by the entry point in pyproject.toml. What it adds to the stock OptunaSweeperImpl:

- `n_trials` is the study's total: re-running the same command continues the study
  until that many trials have finished; trials cut off by a crash are marked failed
  (user attr `interrupted`) and do not count.
- a study name derived from the command when none is given, so "the same command"
  and "the same study" are one thing;
- the sweep fails only when more than `max_failure_rate * n_trials` trials fail,
  counted over the whole study, not per batch;
- one MLflow parent run per study, each trial a child run tagged with its number,
  and the best trial's value, params, run id and plots on the parent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException, HydraException
from hydra.types import HydraContext
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import (
    OptunaSweeperImpl,
    create_optuna_distribution_from_override,
)
from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
from optuna.trial import TrialState

from fashion_sweep import sqlite_wal
from fashion_sweep.compose import ComposeOnce

log = logging.getLogger(__name__)
INTERRUPTED = "interrupted"  # user attr of a trial cut off (crashed, interrupted, surplus)
PARENT_RUN = "mlflow_parent_run_id"  # study user attr
LAUNCHER_LOGGERS = (
    "fashion_sweep.launcher",
    "hydra._internal.core_plugins.basic_launcher",
    "hydra_plugins.hydra_joblib_launcher._core",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher",
)
POLL_SECONDS = 2.0  # how often a worker with nothing to run looks at the others' trials


class SweepError(CompactHydraException):
    """A sweep that cannot start or must stop; Hydra prints just this message."""


class StudySweeper(OptunaSweeperImpl):
    def __init__(self, sampler: Any, **kwargs: Any) -> None:
        sampler = instantiate(
            sampler,
            _execution_whitelist_=("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*"),
        )
        super().__init__(sampler, **kwargs)

    def setup(self, *, hydra_context: HydraContext, task_function: Any, config: Any) -> None:
        # the launcher composes each trial's config through this loader: once per sweep
        hydra_context = dataclasses.replace(
            hydra_context, config_loader=ComposeOnce(hydra_context.config_loader)
        )
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        from fashion_sweep import tracking

        for name in LAUNCHER_LOGGERS:  # they log each job's overrides
            logging.getLogger(name).addFilter(RedactingFilter())
        self._process_searchspace_config()
        space, fixed_params, fixed_overrides = self._search_space(
            self._parse_sweeper_params_config() + list(arguments)
        )
        if isinstance(self.sampler, functools.partial):  # the grid sampler wants the space
            grid = {name: self._to_grid_sampler_choices(d) for name, d in space.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
        metric = self.config.optimized_metric
        direction = self._direction(metric)
        study_name = self.study_name or self._default_study_name(space)
        storage = self._storage()
        where = tracking.redact(getattr(storage, "url", str(storage)))
        study, created = open_study(study_name, storage, self.sampler, direction)
        parent = self._parent_run(
            study,
            created,
            {
                "optuna.study_name": study_name,
                "optuna.storage": where,
                "optuna.n_trials": str(self.n_trials),
                "optuna.direction": direction,
                "optimized_metric": metric,
                "sweep_dir": str(Path(self.sweep_dir).resolve()),
                **{f"space.{k}": str(v) for k, v in space.items()},
            },
        )
        # the command's fixed values, once for the study (the plugin wrote them to every
        # trial: a database write per value per trial)
        study.set_user_attr("fixed_params", fixed_params)
        counted = [t for t in study.get_trials(deepcopy=False) if counts(t)]
        log.info(
            f"Study {study_name!r} in {where}: {len(counted)} of {self.n_trials} trials "
            f"finished; this worker ({worker_id()}) runs up to {self.n_jobs} at a time"
        )
        allowed = self.max_failure_rate * self.n_trials
        pending: list[optuna.trial.Trial] = []  # asked, not yet told
        try:
            while True:
                trials = study.get_trials(deepcopy=False)
                stale = fail_stale_trials(study, trials)
                if stale:
                    log.warning(f"Trials {stale} were cut off earlier: marked failed")
                    for number in stale:
                        tracking.kill_trial_run(parent, number)
                    trials = study.get_trials(deepcopy=False)
                counted = [t for t in trials if counts(t)]
                failures = sum(t.state == TrialState.FAIL for t in counted)
                if failures > allowed:
                    raise SweepError(
                        f"{failures} trials failed, more than hydra.sweeper.max_failure_rate="
                        f"{self.max_failure_rate} of hydra.sweeper.n_trials={self.n_trials} allows"
                    )
                running = [t for t in trials if t.state == TrialState.RUNNING]
                to_go = self.n_trials - len(counted) - len(running)
                if to_go <= 0:
                    if not running:
                        break
                    time.sleep(POLL_SECONDS)  # other workers' trials: wait for the result
                    continue
                # heartbeats from the moment a trial exists, where the storage has them
                with contextlib.ExitStack() as beating:
                    asked = [study.ask() for _ in range(min(self.n_jobs, to_go))]
                    pending = list(asked)
                    for trial in asked:
                        beating.enter_context(get_heartbeat_thread(trial._trial_id, study._storage))
                        trial.set_user_attr("worker", worker_id())
                    asked = drop_surplus(study, asked, self.n_trials)
                    pending = list(asked)
                    if not asked:
                        continue
                    configured = self._configure_trials(asked, space, fixed_params, fixed_overrides)
                    overrides = [
                        (*trial_overrides, *trial_tracking(parent, study_name, trial.number))
                        for trial, trial_overrides in zip(asked, configured, strict=True)
                    ]
                    returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
                self.job_idx += len(returns)
                for trial, ret in zip(asked, returns, strict=True):
                    try:
                        result = ret.return_value  # re-raises the job's exception
                        value = float(result)
                    except Exception as error:
                        # a failed job may have started its run: find it
                        run_id = tracking.trial_run_id(parent, trial.number)
                        if run_id:
                            trial.set_user_attr("mlflow_run_id", run_id)
                        trial.set_user_attr("failure_reason", tracking.one_line(error))
                        tell(study, trial, state=TrialState.FAIL)
                        log.warning(f"Trial {trial.number} failed: {tracking.one_line(error)}")
                    else:
                        run_id = getattr(result, "run_id", None)  # train.Objective
                        run_id = run_id or tracking.trial_run_id(parent, trial.number)
                        if run_id:
                            trial.set_user_attr("mlflow_run_id", run_id)
                        tell(study, trial, values=value)
                    pending.remove(trial)
        except BaseException as error:
            for trial in pending:  # cut off here: failed, not left RUNNING
                mark_interrupted(study, trial._trial_id, "interrupted")
            tracking.close_sweep_run(parent, error)
            raise
        results = self._results(study, study_name, parent, metric)
        Path(self.sweep_dir).mkdir(parents=True, exist_ok=True)  # none made if no trial ran
        OmegaConf.save(OmegaConf.create(results), f"{self.sweep_dir}/optimization_results.yaml")
        tracking.close_sweep_run(
            parent,
            None,
            best={
                "value": results.get("best_value"),
                "params": results.get("best_params", {}),
                "run_id": results.get("best_run_id"),
                "trial": results.get("best_trial"),
            },
            metric=metric,
            step=results["finished"],
            figures=plots(study),
        )
        log.info(f"Best trial: {results.get('best_trial')} {results.get('best_params')}")
        log.info(f"Best {metric}: {results.get('best_value')}")

    def _configure_trials(
        self,
        trials: list[optuna.Trial],
        space: dict[str, BaseDistribution],
        fixed_params: dict[str, Any],
        fixed_overrides: list[str],
    ) -> list[tuple[str, ...]]:
        """Each trial's overrides: its suggested values, then the fixed ones."""
        overrides = []
        for trial in trials:
            for name, distribution in space.items():
                trial._suggest(name, distribution)
            if self.custom_search_space_extender:
                self.custom_search_space_extender(self.config, trial)
            params = {**trial.params, **fixed_params}
            overrides.append(
                (*(f"{name}={value}" for name, value in params.items()), *fixed_overrides)
            )
        return overrides

    def _storage(self) -> Any:
        """An RDBStorage from the URL, or from a `_target_` node (for heartbeats: see
        conf/storage/postgres.yaml); None keeps the study in memory."""
        if self.storage is None:
            return None
        sqlite_wal.enable()
        for attempt in range(5):
            try:
                if OmegaConf.is_dict(self.storage):
                    return instantiate(self.storage, _execution_whitelist_="optuna.storages.*")
                return optuna.storages.RDBStorage(str(self.storage))
            except sqlalchemy.exc.DatabaseError:
                # workers starting together on a new database race to create its
                # tables; the loser finds them made a moment later
                if attempt == 4:
                    raise
                time.sleep(1 + attempt)

    def _parent_run(self, study: optuna.Study, created: bool, tags: dict[str, str]) -> str:
        """The study's MLflow parent run, made by the worker that created the study and
        kept in the study (user attr), so every worker and every resume finds it."""
        from fashion_sweep import tracking

        uri, experiment = self.config.tracking.uri, self.config.tracking.experiment
        parent = study.user_attrs.get(PARENT_RUN)
        for _ in range(0 if created else 60):  # the creator is making it: wait a little
            if parent:
                break
            time.sleep(0.5)
            parent = study.user_attrs.get(PARENT_RUN)
        run_id = tracking.open_sweep_run(uri, experiment, tags["optuna.study_name"], tags, parent)
        if run_id != parent:
            study.set_user_attr(PARENT_RUN, run_id)
        return run_id

    def _search_space(
        self, params: list[str]
    ) -> tuple[dict[str, BaseDistribution], dict[str, Any], list[str]]:
        """The plugin's parsing, with each bad parameter named in the error."""
        space: dict[str, BaseDistribution] = {}
        fixed: dict[str, Any] = {}
        fixed_overrides: list[str] = []
        for line in params:
            try:
                (override,) = OverridesParser.create().parse_overrides([line])
            except HydraException as error:
                raise SweepError(f"sweep parameter {line!r}: {error}") from None
            if override.is_delete():
                fixed_overrides.append(line)
                continue
            key = override.get_key_element()
            if not key.startswith("+") and not _exists(self.config, key):
                raise SweepError(f"sweep parameter {key!r} is not a key of the config")
            try:
                value = create_optuna_distribution_from_override(override)
            except (ValueError, AssertionError) as error:
                raise SweepError(f"sweep parameter {key!r} ({line}): {error}") from None
            if isinstance(value, BaseDistribution):
                space[key] = value
            else:
                fixed[key] = value
        for key in fixed:
            space.pop(key, None)
        return space, fixed, fixed_overrides

    def _direction(self, metric: str) -> str:
        directions = self._get_directions()
        if len(directions) != 1:
            raise SweepError("hydra.sweeper.direction: one direction, for optimized_metric")
        direction = directions[0]
        expected = "minimize" if metric.endswith("loss") else "maximize"
        if direction != expected:
            raise SweepError(
                f"hydra.sweeper.direction={direction} would {direction} {metric}; "
                f"set hydra.sweeper.direction={expected}"
            )
        return direction

    def _default_study_name(self, space: dict[str, BaseDistribution]) -> str:
        """The same command (overrides and search space) names the same study."""
        task = sorted(o for o in self.config.hydra.overrides.task if "hydra." not in o)
        key = repr((task, sorted((k, repr(v)) for k, v in space.items())))
        return f"sweep-{hashlib.sha1(key.encode()).hexdigest()[:8]}"

    def _results(
        self, study: optuna.Study, study_name: str, parent: str, metric: str
    ) -> dict[str, Any]:
        finished = [t for t in study.trials if counts(t)]
        results: dict[str, Any] = {
            "name": "optuna",
            "study_name": study_name,
            "optimized_metric": metric,
            "n_trials": self.n_trials,
            "finished": len(finished),
            "complete": sum(t.state == TrialState.COMPLETE for t in finished),
            "failed": sum(t.state == TrialState.FAIL for t in finished),
            "parent_run_id": parent,
        }
        if results["complete"]:
            best = study.best_trial
            results.update(
                best_trial=best.number,
                best_params=best.params,
                best_value=best.value,
                best_run_id=best.user_attrs.get("mlflow_run_id"),
            )
        return results


def tell(study: optuna.Study, trial: optuna.Trial, **result: Any) -> None:
    try:
        study.tell(trial, **result)
    except RuntimeError as error:
        # the grid sampler calls study.stop() once the grid is done, which only works
        # inside study.optimize(); the trial is told all the same
        if "Study.stop" not in str(error):
            raise


class RedactingFilter(logging.Filter):
    """Masks the password of any URI in a log line (the launchers log the overrides)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from fashion_sweep.tracking import redact

        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, ()
        return True


def trial_tracking(parent_run_id: str, study_name: str, number: int) -> tuple[str, ...]:
    """The overrides that make a trial's MLflow run a child of the sweep's run."""
    return (
        f"tracking.parent_run_id='{parent_run_id}'",
        f"tracking.trial={number}",
        f"tracking.run_name='{study_name} trial {number}'",
    )


def _exists(config: Any, key: str) -> bool:
    if key in config.hydra.runtime.choices:  # a config group, e.g. optimizer=choice(sgd,adam)
        return True
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(config, parent) if parent else config
    return node is not None and leaf in node


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def open_study(name: str, storage: Any, sampler: Any, direction: str) -> tuple[optuna.Study, bool]:
    """The study, and whether this process created it (the database decides the race)."""
    try:
        study = optuna.create_study(
            study_name=name, storage=storage, sampler=sampler, direction=direction
        )
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler), False


def drop_surplus(study: optuna.Study, asked: list, n_trials: int) -> list:
    """Workers that asked at the same moment may overshoot n_trials: the trials whose
    number ranks past n_trials among the live ones step aside (failed, `surplus`)."""
    if all(t.number < n_trials for t in asked):
        return asked  # fewer than n_trials trials, live or not, come before any of them
    live = sorted(
        t.number
        for t in study.get_trials(deepcopy=False)
        if counts(t) or (t.state == TrialState.RUNNING and not t.user_attrs.get(INTERRUPTED))
    )
    allowed = set(live[:n_trials])
    kept = []
    for trial in asked:
        if trial.number in allowed:
            kept.append(trial)
        else:
            mark_interrupted(study, trial._trial_id, "surplus")
    return kept


def counts(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial that counts towards n_trials: finished, and not cut off."""
    return trial.state.is_finished() and not trial.user_attrs.get(INTERRUPTED)


def mark_interrupted(study: optuna.Study, trial_id: int, why: str) -> bool:
    """Fails a RUNNING trial that will not finish, so that it does not count; False if
    another worker got there first."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial_id, INTERRUPTED, why)
        return storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def fail_stale_trials(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> list[int]:
    """Marks the RUNNING trials whose worker is gone as failed (user attr `interrupted`).

    A worker on this host is gone when its process is; one elsewhere when its trial's
    heartbeat is older than the storage's grace period (RDBStorage with
    heartbeat_interval). Returns the numbers of the trials it marked.
    """
    here = socket.gethostname()
    expired = set()
    if is_heartbeat_enabled(study._storage):
        expired = set(study._storage._get_stale_trial_ids(study._study_id))
    marked = []
    for trial in (t for t in trials if t.state == TrialState.RUNNING):
        host, _, pid = str(trial.user_attrs.get("worker", ":")).rpartition(":")
        gone = host == here and pid.isdigit() and not _alive(int(pid))
        if (gone or trial._trial_id in expired) and mark_interrupted(
            study, trial._trial_id, "crashed"
        ):
            marked.append(trial.number)
    return marked


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def plots(study: optuna.Study) -> dict[str, Any]:
    """Optimisation history, parameter importances, lr x batch size; what can be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as vis

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = sorted({p for t in complete for p in t.params})
    wanted = {"optimization_history.png": lambda: vis.plot_optimization_history(study)}
    if len(complete) >= 2 and names:
        wanted["param_importances.png"] = lambda: vis.plot_param_importances(study)
    if len(names) >= 2:
        pair = [n for n in ("optimizer.lr", "data.batch_size") if n in names] or names[:2]
        pair = pair if len(pair) == 2 else names[:2]
        wanted[f"{'_x_'.join(_slug(n) for n in pair)}.png"] = lambda: vis.plot_contour(
            study, params=pair
        )
    figures = {}
    for name, draw in wanted.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = draw()
        except Exception as error:  # a plot that cannot be drawn must not fail the sweep
            log.warning(f"plot {name} skipped: {error}")
            continue
        axes = axes.flat[0] if hasattr(axes, "flat") else axes
        figures[name] = axes.get_figure()
    return figures


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name.rsplit(".", 1)[-1])
