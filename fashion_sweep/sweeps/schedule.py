"""The sweep's decisions, each a small function of the study's trials.

What counts towards n_trials, what is stale, how many trials to ask for, whether a
trial repeats one the study holds, what to run again. No launching, no stores: they
take the trials (Optuna FrozenTrials) and return an answer, so tests can put a study
in any state and ask (tests/test_schedule.py).

A trial is one of:
- counted: COMPLETE, PRUNED, or FAIL on its own (the job failed: user attr
  `failure_reason`, e.g. a diverging loss);
- cut off: FAIL with no `failure_reason`: the sweep stopped it (Ctrl-C), its worker
  died, or it stepped aside before it ran (user attr `interrupted` says which where the
  sweep knows). It does not count; one that ran is run again once, as a new trial
  with user attr `retry_of`;
- running or waiting (enqueued, to be run by whichever worker asks next).

A confirmation trial (user attr `confirms`: the search trial whose configuration it
trains again with another seed, confirm.py) is none of these to the search: it does not
count towards n_trials, hold a configuration, fail the search or run as a retry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from fashion_sweep.sweeps.workers import DEAD_WORKER

FAILURE = "failure_reason"  # user attr: why a trial failed on its own
PRUNED = "pruned"  # user attr of a PRUNED trial (and tag of its MLflow run): its last epoch
CUT_OFF = "interrupted"  # user attr: why the sweep cut a trial off, where it knows
RETRY_OF = "retry_of"  # user attr: the cut-off trial this one runs again
CONFIRMS = "confirms"  # user attr: the search trial a confirmation trial confirms
NOT_RUN = ("surplus", "duplicate")  # cut off before it ran: nothing to run again
DIED = "its process died"  # why a trial was cut off whose launcher's process died


def cut_off(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and FAILURE not in trial.user_attrs


def stepped_aside(trial: FrozenTrial) -> bool:
    """Cut off before it ran (a repeat or a surplus draw): nothing to run again."""
    return cut_off(trial) and trial.user_attrs.get(CUT_OFF) in NOT_RUN


def run_reason(why: str | None) -> str:
    """The failure_reason of the MLflow run of a trial cut off for `why` (its user attr
    `interrupted`): a dead worker's trial (`crashed`, or none where Optuna failed it for
    its silent heartbeat) says its sweep worker died."""
    return DEAD_WORKER if why in (None, "crashed") else why


def confirming(trial: FrozenTrial) -> bool:
    """A trial of the confirmation stage (confirm.py), not of the search."""
    return CONFIRMS in trial.user_attrs


def counts(trial: FrozenTrial) -> bool:
    """A search trial finished, and not cut off: it counts towards n_trials."""
    return trial.state.is_finished() and not cut_off(trial) and not confirming(trial)


@dataclass
class Tally:
    counted: list[FrozenTrial] = field(default_factory=list)
    failed: list[FrozenTrial] = field(default_factory=list)
    running: list[FrozenTrial] = field(default_factory=list)


def tally(trials: list[FrozenTrial]) -> Tally:
    result = Tally()
    for trial in trials:
        if counts(trial):
            result.counted.append(trial)
            if trial.state == TrialState.FAIL:
                result.failed.append(trial)
        elif trial.state == TrialState.RUNNING and not confirming(trial):
            result.running.append(trial)
    return result


def to_ask(state: Tally, n_trials: int, n_jobs: int) -> int:
    """How many trials to ask for now: up to n_jobs, so that counted and running trials
    do not exceed n_trials."""
    return max(0, min(n_jobs, n_trials - len(state.counted) - len(state.running)))


def too_many_failures(
    state: Tally, n_trials: int, max_failure_rate: float, whole: str | None = None
) -> str | None:
    """Why the sweep must stop, if more trials failed than max_failure_rate allows of
    its n_trials (named `whole`, where that is not hydra.sweeper.n_trials)."""
    if len(state.failed) <= max_failure_rate * n_trials:
        return None
    whole = whole or f"hydra.sweeper.n_trials={n_trials}"
    return (
        f"{len(state.failed)} trials failed, more than hydra.sweeper.max_failure_rate="
        f"{max_failure_rate} of {whole} allows{_first_failure(state)}"
    )


def _first_failure(state: Tally) -> str:
    reasons = [t.user_attrs[FAILURE] for t in state.failed if FAILURE in t.user_attrs]
    return f"; the first failed: {reasons[0]}" if reasons else ""


def none_completed(trials: list[FrozenTrial]) -> str | None:
    """Why a sweep whose trials are done has no answer, if no trial completed: how many
    failed or were pruned, and the first failure's reason."""
    if any(t.state == TrialState.COMPLETE and not confirming(t) for t in trials):
        return None
    state = tally(trials)
    pruned = sum(t.state == TrialState.PRUNED for t in state.counted)
    return (
        f"no trial completed: {len(state.failed)} failed, {pruned} pruned, of "
        f"{len(state.counted)} finished{_first_failure(state)}"
    )


def stale(trial: FrozenTrial, alive: bool | None, now: datetime, grace_period: float) -> bool:
    """A RUNNING trial to fail as crashed: its worker is provably gone (`alive` is what
    workers.alive says of its `worker` attr), or it never had a worker and was asked
    more than grace_period seconds ago (a worker killed right after asking).
    A worker that cannot be judged here is left to its heartbeat."""
    if trial.state != TrialState.RUNNING:
        return False
    if not isinstance(trial.user_attrs.get("worker"), dict):  # none yet (or a legacy one)
        started = trial.datetime_start or now
        return (now - started).total_seconds() > grace_period
    return alive is False


def surplus(number: int, trials: list[FrozenTrial], n_trials: int) -> bool:
    """Workers asking at the same moment may overshoot n_trials: a trial whose number
    ranks past n_trials among the counted, running and queued ones (a queued trial is
    the next ask's, whichever worker asks) steps aside."""
    live = sorted(t.number for t in trials if holds(t))
    return number not in live[:n_trials]


def config(trial: FrozenTrial) -> tuple | None:
    """The trial's parameter values as a key; an enqueued trial's are its fixed params."""
    params = trial.params or trial.system_attrs.get("fixed_params")
    return tuple(sorted(params.items())) if params else None


def holds(trial: FrozenTrial) -> bool:
    """A search trial has its configuration: run, running, or to be run."""
    queued = trial.state in (TrialState.RUNNING, TrialState.WAITING)
    return counts(trial) or (queued and not confirming(trial))


def duplicate(trial: FrozenTrial, trials: list[FrozenTrial]) -> bool:
    """Another trial, asked before this one or finished, holds the same configuration."""
    key = config(trial)
    return key is not None and any(
        other.number != trial.number
        and (other.number < trial.number or other.state.is_finished())
        and holds(other)
        and config(other) == key
        for other in trials
    )


def unheld(space_points: list[dict[str, Any]], trials: list[FrozenTrial]) -> list[dict]:
    """The configurations of a finite space that no trial holds."""
    names = set(space_points[0]) if space_points else set()
    held = {
        tuple(sorted((k, v) for k, v in key if k in names))
        for key in (config(t) for t in trials if holds(t))
        if key is not None
    }
    return [p for p in space_points if tuple(sorted(p.items())) not in held]


def retries_due(
    trials: list[FrozenTrial], space: dict[str, BaseDistribution], n_trials: int
) -> list[FrozenTrial]:
    """Cut-off trials that ran, to run again: once each (a retry cut off in turn is not
    retried), only with a value for every parameter of the space, and only as many as
    n_trials leaves room for beside the counted, running and waiting trials."""
    retried = {t.user_attrs.get(RETRY_OF) for t in trials}
    due = [
        t
        for t in trials
        if cut_off(t)
        and not confirming(t)  # confirm.py plans those again itself
        and t.user_attrs.get(CUT_OFF) not in NOT_RUN
        and RETRY_OF not in t.user_attrs
        and t.number not in retried
        and set(space) <= set(t.params)
        and space
    ]
    return due[: max(0, n_trials - sum(holds(t) for t in trials))]


def trial_seed(seed: int | None, number: int) -> int | None:
    """The sampler's seed for trial `number` of a study seeded `seed`: the same for the
    same trial in every process, different for every trial."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
