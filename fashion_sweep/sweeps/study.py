"""A sweep's Optuna study: every call to its storage, its definition, and its record.

- `storage` opens the database with Optuna's heartbeats on, whatever the database
  (SQLite too), so a trial whose worker dies is failed within a grace period.
- `definition` is what the study's trials compute (search space, sampler and seed,
  objective, the config's values); a study name is kept for one definition, and the
  default name is derived from it.
- `record` and `cut_off` tell the study how a trial ended, once; `trial` finds a trial
  to record from any process (callbacks.ReportToStudy records each job's outcome from
  the process that ran it), `held` reads it as the study holds it now.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna
import sqlalchemy.exc
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from fashion_sweep.config import flatten
from fashion_sweep.sweeps.schedule import CUT_OFF, FAILURE, PRUNED
from fashion_sweep.sweeps.snapshot import Snapshot
from fashion_sweep.tracking import sqlite_wal
from fashion_sweep.tracking.redaction import one_line, redact

log = logging.getLogger(__name__)
DEFINITION = "definition"  # study user attr
# How trials run, not what they compute: left out of a study's definition, so a study
# can move to other machines, devices or MLflow stores.
RUNTIME_KEYS = (
    "tracking",
    "data.root",
    "data.download",
    "data.loader",
    "data.num_workers",
    "trainer.device",
    "trainer.cuda_graph",
    "trainer.log_interval",
    "trainer.share_cores",
)
# The storages this process opened, by URL (None: in memory), so jobs that run in the
# sweep's own process record into the sweep's storage; and the studies it records into.
_STORAGES: dict[str | None, Any] = {}
_RECORDING: dict[tuple[str | None, str], tuple[optuna.Study, Any, int] | None] = {}
_TRIAL_IDS: dict[tuple[str | None, str, int], int] = {}  # (storage, study, number) -> id
_ABSENT = object()
# what a database says to a worker that lost the race to create its tables
RACE_SIGNS = ("already exists", "duplicate key", "database is locked", "UNIQUE constraint")


class StudyError(Exception):
    """A study that cannot be used as asked; the message says why."""


def quiet(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call` without Optuna's notes on what we use knowingly: heartbeats are
    experimental, and meant for study.optimize, which Hydra's launchers replace."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used")
        return call(*args, **kwargs)


def storage(url: str | None, heartbeat_interval: int, grace_period: int, on_stale: Callable) -> Any:
    """The study's database with heartbeats on; None keeps the study in memory."""
    if url is None:
        _STORAGES[None] = optuna.storages.InMemoryStorage()
        return _STORAGES[None]
    sqlite_wal.enable()
    for attempt in range(5):
        try:
            opened = quiet(
                optuna.storages.RDBStorage,
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=on_stale,
            )
            break
        except Exception as error:
            # workers starting together on a new database race to create its tables;
            # the loser finds them made a moment later. Any other error is for good.
            racing = isinstance(error, sqlalchemy.exc.DatabaseError) and any(
                sign in str(error) for sign in RACE_SIGNS
            )
            if not racing or attempt == 4:
                raise StudyError(f"storage {redact(url)}: {one_line(error)}") from None
            time.sleep(1 + attempt)
    _STORAGES[url] = opened
    return opened


def forget() -> None:
    """Drops what this process holds open (tests that run sweeps in one process)."""
    _STORAGES.clear()
    _RECORDING.clear()
    _TRIAL_IDS.clear()


def open_study(
    name: str, where: Any, sampler: BaseSampler, directions: list[str], pruner: Any = None
) -> tuple[optuna.Study, bool]:
    """The study, and whether this process created it (the database decides the race).
    The pruner decides nothing here (each trial asks its own, pruning.Pruning); the
    sampler reads it (TPE keeps Hyperband's brackets apart)."""
    try:
        return optuna.create_study(
            study_name=name,
            storage=where,
            sampler=sampler,
            directions=directions,
            pruner=pruner,
        ), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(
            study_name=name, storage=where, sampler=sampler, pruner=pruner
        ), False


def for_asking(
    held: optuna.Study, where: Any, worker: dict[str, Any] | None = None
) -> tuple[optuna.Study, Snapshot]:
    """The study `held` in storage `where` (the one `held` reads: what Optuna's
    get_storage made of the database) as `worker` asks it for trials: over a Snapshot of
    that storage, with the study's sampler and pruner (snapshot.py)."""
    snapshot = Snapshot(where, worker)
    asking = optuna.load_study(
        study_name=held.study_name, storage=snapshot, sampler=held.sampler, pruner=held.pruner
    )
    return asking, snapshot


def computed(key: str) -> bool:
    """Whether a config key changes what a trial computes (not where it runs or logs)."""
    return not _under(key.lstrip("+~"), RUNTIME_KEYS)


def name_metric(held: optuna.Study, metrics: list[str]) -> None:
    """The study's objectives named (Optuna's plots and dashboard then say them)."""
    if held.metric_names != metrics:
        quiet(held.set_metric_names, metrics)


def definition(
    config: DictConfig,
    space: dict[str, BaseDistribution],
    fixed: dict[str, Any],
    sampler: DictConfig,
    metrics: list[str],
    directions: list[str],
    extender: str | None = None,
    pruner: DictConfig | None = None,
) -> dict[str, Any]:
    """What a study's trials compute: its objective, sampler (and seed), pruner (where
    there is one), search space (and the function that extends it,
    hydra.sweeper.custom_search_space, if any),
    and the trials' config outside the space (RUNTIME_KEYS left out). `fixed` are the
    sweep's fixed values (`key=value` as parsed, strings), set into the config as
    Hydra sets them into each trial's."""
    groups = set(config.hydra.runtime.choices)
    task = OmegaConf.masked_copy(config, [k for k in config if k not in ("hydra", "tracking")])
    extra = {}
    for key, value in fixed.items():
        key = key.lstrip("+")  # an added key (+key=value) is a key all the same
        if key in groups or _under(key, RUNTIME_KEYS):
            continue  # a group's choice shows in its values; where it runs is not the study
        if OmegaConf.select(task, key, default=_ABSENT) is _ABSENT:
            extra[key] = value
        else:
            OmegaConf.update(task, key, value)  # typed by the schema: "64" -> 64
    values = flatten(OmegaConf.to_container(task, resolve=True, enum_to_str=True))
    values = {
        key: redact(value) if isinstance(value, str) else value  # it is kept in the study
        for key, value in {**values, **extra}.items()
        if not _under(key, RUNTIME_KEYS) and not _under(key, tuple(space))
    }
    return {
        "objective": ", ".join(f"{d} {m}" for d, m in zip(directions, metrics, strict=True)),
        "sampler": OmegaConf.to_container(sampler, resolve=True),
        **({"pruner": OmegaConf.to_container(pruner, resolve=True)} if pruner else {}),
        "space": {key: repr(d) for key, d in sorted(space.items())},
        **({"custom_search_space": extender} if extender else {}),
        "config": {key: values[key] for key in sorted(values)},
    }


def default_name(defined: dict[str, Any]) -> str:
    """The same definition, the same name: re-running a command continues its study."""
    digest = hashlib.sha1(json.dumps(defined, sort_keys=True, default=str).encode())
    return f"sweep-{digest.hexdigest()[:8]}"


def differences(held: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    """`key: study's value -> this command's` for each part of two definitions."""
    ours, theirs = flatten(asked), flatten(held)
    return [
        f"{key}: {theirs.get(key, '(none)')} -> {ours.get(key, '(none)')}"
        for key in sorted(set(ours) | set(theirs))
        if ours.get(key) != theirs.get(key)
    ]


def check_definition(study: optuna.Study, defined: dict[str, Any], created: bool) -> None:
    """Records the definition in a new study; refuses a study defined otherwise."""
    if created:
        study.set_user_attr(DEFINITION, defined)
        return
    held = study.user_attrs.get(DEFINITION)  # read from the storage each time
    for _ in range(20):  # its creator records it a moment after creating it
        if held is not None:
            break
        time.sleep(0.25)
        held = study.user_attrs.get(DEFINITION)
    if held is None:
        log.warning(f"Study {study.study_name!r} has no definition on record: recording this one")
        study.set_user_attr(DEFINITION, defined)
        return
    changed = differences(held, defined)
    if changed:
        raise StudyError(
            f"hydra.sweeper.study_name={study.study_name} holds another sweep "
            f"({'; '.join(changed)}): run that sweep's command, or name a new study"
        )


def _under(key: str, roots: tuple[str, ...]) -> bool:
    return any(key == root or key.startswith(f"{root}.") for root in roots)


def tell(study: optuna.Study, trial: optuna.Trial | int, **result: Any) -> None:
    """study.tell; raises ValueError or UpdateFinishedTrialError if the trial had ended."""
    try:
        quiet(study.tell, trial, **result)
    except RuntimeError as error:
        # the grid sampler calls study.stop() once the grid is done, which only works
        # inside study.optimize(); the trial is told all the same
        if "Study.stop" not in str(error):
            raise


def record(
    study: optuna.Study,
    trial: optuna.Trial,
    outcome: Any,
    run_id: str | None,
    pruned: int | None = None,
) -> bool:
    """Tells the study a trial's outcome: its value (one per direction), the reason it
    failed (user attr `failure_reason`; a value that is none, too), or that it was
    pruned after epoch `pruned` (PRUNED, user attr `pruned`; a run.Objective says so
    itself, a Pruned knows its step or not), with its MLflow run. False if the trial had
    already been ended (cut off by the sweep, or found dead)."""
    pruned = pruned or getattr(outcome, "pruned", None)
    if not isinstance(outcome, str) and not pruned:
        outcome = values_of(outcome, len(study.directions))
    try:
        if run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
        if isinstance(outcome, str):
            trial.set_user_attr(FAILURE, outcome)
            tell(study, trial, state=TrialState.FAIL)
        elif pruned:
            if pruned is not True:
                trial.set_user_attr(PRUNED, pruned)
            tell(study, trial, state=TrialState.PRUNED)
        else:
            tell(study, trial, values=outcome)
    except (ValueError, UpdateFinishedTrialError):
        return False
    return True


def values_of(returned: Any, directions: int) -> list[float] | str:
    """What a task function returned as the study's values, one per direction; or why
    it is none (a failure reason)."""
    try:  # several values: any sequence of them (a list, a tuple, an array, a tensor)
        raw = [returned] if isinstance(returned, str | bytes) else list(returned)
    except TypeError:  # one value (a float, a 0-d array)
        raw = [returned]
    wanted = "a number" if directions == 1 else f"{directions} numbers, one per direction"
    shown = repr(returned) if len(repr(returned)) <= 80 else f"{repr(returned)[:77]}..."
    try:
        values = [float(v) for v in raw]
    except (TypeError, ValueError):
        return f"the task returned {shown}, not {wanted}"
    if len(values) != directions:
        return f"the task returned {len(values)} values, not {wanted}"
    if any(math.isnan(v) for v in values):
        return f"the task returned {shown}: nan is no value"
    return values


class Pruned:
    """The outcome of a job whose task stopped because its trial was pruned
    (optuna.TrialPruned), after step `pruned` where known (True: not known)."""

    def __init__(self, step: int | None) -> None:
        self.pruned = step if step else True


def cut_off(study: optuna.Study, trial: optuna.Trial, why: str) -> bool:
    """Fails a trial that will not finish (user attr `interrupted`: why); False if it
    had already ended."""
    try:
        trial.set_user_attr(CUT_OFF, why)
        tell(study, trial, state=TrialState.FAIL)
    except (ValueError, UpdateFinishedTrialError):
        return False
    return True


def trial(url: str | None, name: str, number: int) -> tuple[optuna.Study, optuna.Trial] | None:
    """Trial `number` of a study, to record its end from any process (no sampling);
    None for a study in another process's memory."""
    opened = _for_recording(url, name)
    if opened is None:
        return None
    recording, where, study_id = opened
    trial_id = where.get_trial_id_from_study_id_trial_number(study_id, number)
    return recording, optuna.trial.Trial(recording, trial_id)


def held(url: str | None, name: str, number: int) -> FrozenTrial | None:
    """Trial `number` as the study holds it now, from any process; None for a study in
    another process's memory."""
    opened = _for_recording(url, name)
    if opened is None:
        return None
    _, where, study_id = opened
    if (url, name, number) not in _TRIAL_IDS:  # asked after every epoch: one query, not two
        _TRIAL_IDS[url, name, number] = where.get_trial_id_from_study_id_trial_number(
            study_id, number
        )
    return where.get_trial(_TRIAL_IDS[url, name, number])


def _for_recording(url: str | None, name: str) -> tuple[optuna.Study, Any, int] | None:
    """The study to record into, opened once per process (a worker's trials share it)."""
    if (url, name) not in _RECORDING:
        _RECORDING[url, name] = load(url, name)
    return _RECORDING[url, name]


def opened_here(url: str | None) -> bool:
    """Whether this process opened the study's storage `url` (the sweep's own process)."""
    return url in _STORAGES


def load(
    url: str | None, name: str, pruner: Any = None, view: Callable[[Any], Any] | None = None
) -> tuple[optuna.Study, Any, int] | None:
    """Study `name` for recording into (no sampling), its storage and its id: the
    storage this process opened, or a new connection; None for a study in another
    process's memory. `view`: what the study reads through, made of what Optuna's
    get_storage makes of that storage (pruning.py's RoundReads)."""
    where = _STORAGES.get(url)
    if where is None:
        if url is None:
            return None  # in memory, in another process: the sweep records the outcome
        sqlite_wal.enable()
        where = optuna.storages.RDBStorage(url)
    sampler = optuna.samplers.RandomSampler()  # constructing a Trial asks the sampler
    reads = view(optuna.storages.get_storage(where)) if view else where
    recording = optuna.load_study(study_name=name, storage=reads, sampler=sampler, pruner=pruner)
    return recording, where, where.get_study_id_from_name(name)


def outcome_of(
    job: Any, uri: str | None, parent_run_id: str | None, number: int, quiet: bool = False
) -> tuple[Any, str | None] | None:
    """A job's outcome (its value, Pruned, or why it failed) and its MLflow run (where
    the sweep has runs: `uri`, `parent_run_id`); None for a job cut off by a signal,
    which the sweep marks. `quiet`: without Hydra's "Error executing job with overrides"
    block on stderr (the trial's log has its traceback)."""
    said = io.StringIO()  # Hydra's "Error executing job" block, said below where it is news
    try:
        with contextlib.redirect_stderr(said):
            outcome = job.return_value  # re-raises the job's exception
    except optuna.TrialPruned as pruned:  # trial.report's, or the app's own: no error
        return Pruned(getattr(pruned, "step", None)), None
    except Exception as error:
        if not quiet:
            sys.stderr.write(said.getvalue())
        if not parent_run_id:
            return one_line(error), None
        from fashion_sweep.tracking.sweep_runs import trial_run_id  # a failed job's run

        return one_line(error), trial_run_id(uri, parent_run_id, number)
    except BaseException:
        return None
    return outcome, getattr(outcome, "run_id", None)  # run.Objective carries it
