"""One worker's run of a sweep: ask the study for trials, launch them, until it is done.

`Sweep.run` opens the study (refusing one defined otherwise), then loops: fail the
trials whose workers are gone and queue their configurations again, stop when enough
trials failed, ask for as many trials as are missing (never one the study holds),
launch them, and wait for other workers' trials when nothing is left to ask. Each job
records its own outcome in the study as it returns (study.ReportToStudy); what the
loop cuts off when it is interrupted is marked so, and runs again on the next run.
The decisions are in fashion_sweep/schedule.py.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import random
import re
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
from omegaconf import OmegaConf, read_write
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from fashion_sweep import schedule, signals, study, tracking, workers
from fashion_sweep.redaction import mask_log_records, redact
from fashion_sweep.schedule import RETRY_OF
from fashion_sweep.sweeper import StudySweeper, SweepError

log = logging.getLogger(__name__)
PARENT_RUN = "mlflow_parent_run_id"  # study user attr
POLL_SECONDS = 2.0  # how often a worker with nothing to run looks at the others' trials
DEAD_WORKER = "interrupted: its sweep worker died"  # failure_reason of a crashed trial's run
SAY_EVERY = 30.0  # seconds between the lines saying what a waiting worker waits for
SAMPLERS = ("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*")
# Samplers whose seed fixes one sequence of points that trials take by number or by what
# is left (the same in every process): seeded once, not per trial.
SEQUENCES = (optuna.samplers.GridSampler, optuna.samplers.QMCSampler)


class Sweep:
    def __init__(self, sweeper: StudySweeper, arguments: list[str]) -> None:
        self.sweeper, self.config = sweeper, sweeper.config
        self.n_trials = sweeper.n_trials
        self.arguments = arguments
        self.pending: list[optuna.Trial] = []  # asked by this worker, not yet recorded
        self.job_idx = 0
        self.ids: dict[int, int] = {}  # trial number -> the storage's trial id
        self.said: tuple[Any, float] = ((), 0.0)  # what the last waiting line said, when

    def run(self) -> None:
        mask_log_records()  # the launchers log each job's overrides, URIs and all
        params = [f"{k}={v}" for k, v in (self.sweeper.params or {}).items()]
        self.space, fixed, self.fixed_overrides = self._search_space(params + self.arguments)
        self.fixed = fixed
        self.points = schedule.points(self.space)
        self.extend = self._extender()
        sampler = self._sampler()
        self._preflight()
        metric = self.config.optimized_metric
        direction = self._direction(metric)
        defined = study.definition(
            self.config,
            self.space,
            fixed,
            self.sweeper.sampler,
            metric,
            direction,
            self.sweeper.custom_search_space,
            self.sweeper.pruner if self.sweeper.prunes else None,
        )
        self.name = self.sweeper.study_name or study.default_name(defined)
        url = self.sweeper.storage
        try:
            self.where = study.storage(
                url, self.sweeper.heartbeat_interval, self.sweeper.grace_period, self._on_stale
            )
            pruner = self.sweeper.make_pruner()  # TPE samples Hyperband's brackets apart
            self.study, created = study.open_study(
                self.name, self.where, sampler, direction, pruner
            )
            study.check_definition(self.study, defined, created)
        except study.StudyError as error:
            raise SweepError(str(error)) from None
        self.study_id = self.where.get_study_id_from_name(self.name)
        self.sweep_dir = self._claim_sweep_dir()
        where = redact(url) if url else "memory"
        self.parent = self._parent_run(created, where, direction, metric)
        state = schedule.tally(self.study.get_trials(deepcopy=False))
        log.info(
            f"Study {self.name!r} in {where}: {len(state.counted)} of {self.n_trials} trials "
            f"finished; this worker ({workers.me()['id']}) runs up to "
            f"{self.sweeper.n_jobs} at a time"
        )
        self.beats = workers.Heartbeats(self._beat, self.sweeper.heartbeat_interval)
        try:
            self._loop()
            self._finish(metric)
        except BaseException as error:
            why = signals.reason(error)  # Ctrl-C, SIGTERM, SIGHUP, or an error here
            for trial in list(self.pending):
                try:
                    self._settle(self.study, trial, why)
                except Exception:  # MLflow out of reach: the study is what counts
                    study.cut_off(self.study, trial, why)
            tracking.close_sweep_run(self.parent, error)
            raise
        finally:
            self.beats.stop()

    def _preflight(self) -> None:
        """A trial's config, checked before any store opens (fashion_sweep.train.preflight,
        which also sets up the MLflow store and the data on first use): a value no trial
        can run with is refused now, not trial after trial. What depends on the trial's
        own values (a learning rate the space allows) is left to the trial."""
        from fashion_sweep.data import DataError
        from fashion_sweep.train import ConfigError, preflight

        point = {name: _some_value(d) for name, d in self.space.items()}
        lines = [f"{k}={v}" for k, v in {**point, **self.fixed}.items()]
        try:
            config = self.sweeper.compose.load_sweep_config(
                self.config, [*lines, *self.fixed_overrides]
            )
        except HydraException:
            return  # this point does not compose (a group's own keys): each trial says so
        try:
            preflight(config, try_step=False)  # a trial takes check()'s step where it trains
        except ConfigError as error:
            if not _related(error.keys, self.space):
                raise SweepError(str(error)) from None
        except DataError as error:
            raise SweepError(str(error)) from None

    def _loop(self) -> None:
        while True:
            trials = self._reap()
            state = schedule.tally(trials)
            if why := schedule.too_many_failures(
                state, self.n_trials, self.sweeper.max_failure_rate
            ):
                raise SweepError(why)
            wanted = schedule.to_ask(state, self.n_trials, self.sweeper.n_jobs)
            if wanted:
                asked = self._ask(wanted)
                if asked:
                    self._launch(asked)
            elif state.running:
                self._wait(state.running)
            else:
                return

    def _reap(self) -> list[FrozenTrial]:
        """Ends the running trials whose workers are gone, queues again what was cut off
        (as far as n_trials has room); the study's trials after that."""
        study.quiet(optuna.storages.fail_stale_trials, self.study)  # by heartbeat: _on_stale
        trials = self.study.get_trials(deepcopy=False)
        now, grace = datetime.now(), self.sweeper.grace_period
        stale = [
            t
            for t in trials
            if schedule.stale(t, workers.alive(t.user_attrs.get("worker")), now, grace)
        ]
        for trial in stale:
            found = study.trial(self.sweeper.storage, self.name, trial.number)
            if found and self._settle(*found, "crashed"):
                log.warning(self._gone(trial))
        if stale:
            trials = self.study.get_trials(deepcopy=False)
        due = schedule.retries_due(trials, self.space, self.n_trials)
        for trial in due:
            self.study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})
            log.info(f"Trial {trial.number} was cut off: its configuration runs again")
        return self.study.get_trials(deepcopy=False) if due else trials

    def _settle(self, holder: optuna.Study, trial: optuna.Trial, why: str) -> bool:
        """Ends a trial that will run no further. A job that ended its MLflow run but was
        cut off before it recorded its outcome is recorded as its run ended; any other
        trial is cut off (user attr `interrupted`), its MLflow run KILLED. True if it was
        cut off here."""
        uri = self.config.tracking.uri
        run = tracking.trial_run(uri, self.parent, trial.number)
        ended = tracking.ended_as(run, self.config.optimized_metric) if run else None
        if ended is not None:
            pruned = run.data.tags.get(schedule.PRUNED)
            study.record(holder, trial, ended, run.info.run_id, int(pruned) if pruned else None)
            return False
        if not study.cut_off(holder, trial, why):
            return False
        tracking.kill_run(uri, run, DEAD_WORKER if why == "crashed" else why)
        return True

    def _on_stale(self, _: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's callback for a trial it failed because its heartbeat stopped."""
        log.warning(self._gone(trial))
        uri = self.config.tracking.uri
        tracking.kill_run(uri, tracking.trial_run(uri, self.parent, trial.number), DEAD_WORKER)

    def _gone(self, trial: FrozenTrial) -> str:
        worker = workers.name(trial.user_attrs.get("worker"))
        return f"Trial {trial.number} (worker {worker}) was cut off: marked failed"

    def _ask(self, wanted: int) -> list[optuna.Trial]:
        """Up to `wanted` new trials, each with this worker's heartbeat and name; a trial
        that overshoots n_trials or repeats a held configuration steps aside."""
        asked: list[optuna.Trial] = []
        for _ in range(wanted + 10):  # a few redraws for repeats, then what there is
            if len(asked) == wanted:
                break
            trial = study.quiet(self.study.ask, self.space)
            self.pending.append(trial)
            self.beats.add(self._trial_id(trial.number))  # a sign of life, then a name
            trial.set_user_attr("worker", workers.me())
            if self.extend is not None:
                self.extend(self.config, trial)
            trials = self.study.get_trials(deepcopy=False)
            frozen = next(t for t in trials if t.number == trial.number)
            if schedule.surplus(trial.number, trials, self.n_trials):
                self._step_aside(trial, "surplus")
                break
            if schedule.duplicate(frozen, trials) and self._redraw(trials, trial.number):
                self._step_aside(trial, "duplicate")
                continue
            asked.append(trial)
        return asked

    def _redraw(self, trials: list[FrozenTrial], number: int) -> bool:
        """Whether a repeated configuration is drawn again: always, where the space is
        infinite; in a finite one while points are left, one of which is queued."""
        if self.points is None:
            return True
        left = schedule.unheld(self.points, trials)
        if not left:
            return False  # the space has fewer points than n_trials: repeats must come
        pick = random.Random(schedule.trial_seed(self._seed(), number)).choice(left)
        self.study.enqueue_trial(pick)
        return True

    def _launch(self, asked: list[optuna.Trial]) -> None:
        overrides = [self._overrides(trial) for trial in asked]
        returns = self.sweeper.launcher.launch(overrides, initial_job_idx=self.job_idx)
        self.job_idx += len(returns)
        ended = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        for trial, job in zip(asked, returns, strict=True):
            reason = ended[trial.number].user_attrs.get(schedule.FAILURE)
            if ended[trial.number].state == TrialState.RUNNING:  # its job could not record it
                reason = self._record(trial, job)
            if reason:
                log.warning(f"Trial {trial.number} failed: {reason}")
            elif pruned := ended[trial.number].user_attrs.get(schedule.PRUNED):
                log.info(f"Trial {trial.number} pruned after epoch {pruned}")
            self.beats.discard(self._trial_id(trial.number))
            self.pending.remove(trial)

    def _record(self, trial: optuna.Trial, job: Any) -> str | None:
        """Records a job's outcome here (a study in this process's memory, a job whose
        process died); the reason it failed, if it did."""
        ended = study.outcome_of(job, self.config.tracking.uri, self.parent, trial.number)
        if ended is None:
            return None
        outcome, run_id = ended
        study.record(self.study, trial, outcome, run_id)
        return outcome if isinstance(outcome, str) else None

    def _overrides(self, trial: optuna.Trial) -> tuple[str, ...]:
        """A trial's overrides: its values, the fixed ones, and its place in MLflow."""
        values = {**trial.params, **self.fixed}
        return (
            *(f"{name}={value}" for name, value in values.items()),
            *self.fixed_overrides,
            f"tracking.parent_run_id='{self.parent}'",
            f"tracking.trial={trial.number}",
            f"tracking.study='{self.name}'",
            f"tracking.run_name='{self.name} trial {trial.number}'",
        )

    def _step_aside(self, trial: optuna.Trial, why: str) -> None:
        """Cuts off a trial of this worker's that never ran (surplus, duplicate)."""
        study.cut_off(self.study, trial, why)
        self.beats.discard(self._trial_id(trial.number))
        self.pending.remove(trial)

    def _wait(self, running: list[FrozenTrial]) -> None:
        """Waits for other workers' trials, saying which, and until when at most."""
        now = time.monotonic()
        numbers = tuple(t.number for t in running)
        if numbers != self.said[0] or now - self.said[1] > SAY_EVERY:
            whose = ", ".join(
                f"{t.number} ({workers.name(t.user_attrs.get('worker'))})" for t in running
            )
            log.info(
                f"Waiting for trials of other workers: {whose}; a trial whose worker "
                f"stops beating is failed after {self.sweeper.grace_period} s"
            )
            self.said = (numbers, now)
        time.sleep(POLL_SECONDS)

    def _finish(self, metric: str) -> None:
        results = self._results(metric)
        path = Path(self.sweep_dir, "optimization_results.yaml")
        OmegaConf.save(OmegaConf.create(results), path)
        tracking.close_sweep_run(
            self.parent,
            None,
            best={
                "value": results.get("best_value"),
                "params": results.get("best_params", {}),
                "run_id": results.get("best_run_id"),
                "trial": results.get("best_trial"),
            },
            metric=metric,
            step=results["finished"],
            figures=plots(self.study),
        )
        log.info(f"Best trial: {results.get('best_trial')} {results.get('best_params')}")
        log.info(f"Best {metric}: {results.get('best_value')}")

    def _results(self, metric: str) -> dict[str, Any]:
        trials = self.study.get_trials(deepcopy=False)
        state = schedule.tally(trials)
        results: dict[str, Any] = {
            "name": "optuna",
            "study_name": self.name,
            "optimized_metric": metric,
            "n_trials": self.n_trials,
            "finished": len(state.counted),
            "complete": sum(t.state == TrialState.COMPLETE for t in state.counted),
            "failed": len(state.failed),
            "cut_off": sum(schedule.cut_off(t) for t in trials),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "parent_run_id": self.parent,
        }
        if results["complete"]:
            best = self.study.best_trial
            results.update(
                best_trial=best.number,
                best_params=best.params,
                best_value=best.value,
                best_run_id=best.user_attrs.get("mlflow_run_id"),
            )
        return results

    def _parent_run(self, created: bool, where: str, direction: str, metric: str) -> str:
        """The study's MLflow parent run, made by the worker that created the study and
        kept in the study (user attr), so every worker and every resume finds it."""
        tags = {
            "optuna.study_name": self.name,
            "optuna.storage": where,
            "optuna.n_trials": str(self.n_trials),
            "optuna.direction": direction,
            "optimized_metric": metric,
            "sweep_dir": str(Path(self.sweep_dir).resolve()),
            **{f"space.{k}": str(v) for k, v in self.space.items()},
        }
        parent = self.study.user_attrs.get(PARENT_RUN)
        for _ in range(0 if created else 60):  # the creator is making it: wait a little
            if parent:
                break
            time.sleep(0.5)
            parent = self.study.user_attrs.get(PARENT_RUN)
        tracking_cfg = self.config.tracking
        run_id = tracking.open_sweep_run(
            tracking_cfg.uri, tracking_cfg.experiment, self.name, tags, parent
        )
        if run_id != parent:
            self.study.set_user_attr(PARENT_RUN, run_id)
        return run_id

    def _claim_sweep_dir(self) -> str:
        """This worker's own sweep folder: Hydra's, or with `-1`, `-2`, ... added when
        another worker started in the same second. Trial folders are trial numbers."""
        base = Path(str(self.config.hydra.sweep.dir))
        for n in itertools.count():
            path = base if n == 0 else base.with_name(f"{base.name}-{n}")
            try:
                path.mkdir(parents=True)
                break
            except FileExistsError:
                continue
        with read_write(self.config.hydra.sweep):
            self.config.hydra.sweep.dir = str(path)
        self.sweeper.compose.sweep_dir = str(path)  # each job's config says so too
        return str(path)

    def _sampler(self) -> optuna.samplers.BaseSampler:
        try:
            make = instantiate(self.sweeper.sampler, _partial_=True, _execution_whitelist_=SAMPLERS)
        except HydraException as error:
            raise SweepError(f"hydra.sweeper.sampler: {str(error).splitlines()[0]}") from None
        kind = make.func
        if kind is optuna.samplers.GridSampler:  # the grid sampler wants the space
            grid = {name: schedule.values(d) for name, d in self.space.items()}
            if any(v is None for v in grid.values()):
                raise SweepError("the grid sampler needs a finite search space (choice, range)")
            make = functools.partial(make, grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
        try:
            first = make()  # its arguments, checked here, before any store opens
        except (TypeError, ValueError) as error:
            raise SweepError(f"hydra.sweeper.sampler: {str(error).splitlines()[0]}") from None
        if kind in SEQUENCES:
            return first
        return study.PerTrialSeed(make, self._seed())

    def _extender(self) -> Any:
        """hydra-optuna-sweeper's custom_search_space: a function the sweep's config names
        to suggest more parameters per trial; None if there is none."""
        name = self.sweeper.custom_search_space
        if not name:
            return None
        try:  # the sweep's own config names it, as the plugin lets it
            return instantiate({"_target_": name, "_partial_": True}, _execution_whitelist_=name)
        except Exception as error:
            raise SweepError(f"hydra.sweeper.custom_search_space={name}: {error}") from None

    def _seed(self) -> int | None:
        return self.sweeper.sampler.get("seed")

    def _trial_id(self, number: int) -> int:
        if number not in self.ids:
            self.ids[number] = self.where.get_trial_id_from_study_id_trial_number(
                self.study_id, number
            )
        return self.ids[number]

    def _beat(self, trial_id: int) -> None:
        if hasattr(self.where, "record_heartbeat"):  # a database, not memory
            self.where.record_heartbeat(trial_id)

    def _search_space(
        self, params: list[str]
    ) -> tuple[dict[str, BaseDistribution], dict[str, Any], list[str]]:
        """hydra-optuna-sweeper's parsing, with each bad parameter named in the error."""
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
        direction = self.sweeper.direction
        if not isinstance(direction, str):
            directions = list(direction) if OmegaConf.is_list(direction) else [direction]
            if len(directions) != 1:
                raise SweepError("hydra.sweeper.direction: one direction, for optimized_metric")
            direction = getattr(directions[0], "name", directions[0])
        expected = "minimize" if metric.endswith("loss") else "maximize"
        if direction != expected:
            raise SweepError(
                f"hydra.sweeper.direction={direction} would {direction} {metric}; "
                f"set hydra.sweeper.direction={expected}"
            )
        return direction


def _related(keys: tuple[str, ...], space: dict[str, BaseDistribution]) -> bool:
    """Whether an error about `keys` may depend on the searched values: a key of the
    space, inside one (`optimizer` for `optimizer=choice(sgd,adam)`), or holding one."""
    searched = [name.lstrip("+~") for name in space]
    return any(
        key == name or key.startswith(f"{name}.") or name.startswith(f"{key}.")
        for key in keys
        for name in searched
    )


def _some_value(distribution: BaseDistribution) -> Any:
    """A value the search space holds: its first choice, or its low end."""
    choices = getattr(distribution, "choices", None)
    return choices[0] if choices else distribution.low


def _exists(config: Any, key: str) -> bool:
    if key in config.hydra.runtime.choices:  # a config group, e.g. optimizer=choice(sgd,adam)
        return True
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(config, parent) if parent else config
    return node is not None and leaf in node


def plots(handle: optuna.Study) -> dict[str, Any]:
    """Optimisation history, parameter importances, lr x batch size; what can be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as vis

    complete = handle.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = sorted({p for t in complete for p in t.params})
    wanted = {"optimization_history.png": lambda: vis.plot_optimization_history(handle)}
    if any(t.intermediate_values for t in handle.get_trials(deepcopy=False)):  # a pruner
        wanted["intermediate_values.png"] = lambda: vis.plot_intermediate_values(handle)
    if len(complete) >= 2 and names:
        wanted["param_importances.png"] = lambda: vis.plot_param_importances(handle)
    if len(names) >= 2:
        pair = [n for n in ("optimizer.lr", "data.batch_size") if n in names] or names[:2]
        pair = pair if len(pair) == 2 else names[:2]
        wanted[f"{'_x_'.join(_slug(n) for n in pair)}.png"] = lambda: vis.plot_contour(
            handle, params=pair
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
