"""The sweep's decisions, on in-memory studies put in the states a sweep meets."""

from __future__ import annotations

from datetime import datetime, timedelta

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from fashion_sweep.sweeps import schedule
from fashion_sweep.sweeps import space as sweep_space

LR = FloatDistribution(1e-4, 1, log=True)
BATCH = CategoricalDistribution([32, 64])
SPACE = {"optimizer.lr": LR, "data.batch_size": BATCH}
NOW = datetime(2026, 11, 27, 12, 0, 0)


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def add(study, state, params=None, **user_attrs):
    """A trial in `state` with `params` (defaults: lr 0.1, batch 32)."""
    params = params or {"optimizer.lr": 0.1, "data.batch_size": 32}
    study.add_trial(
        optuna.trial.create_trial(
            state=state,
            value=0.5 if state == TrialState.COMPLETE else None,
            params=params if state != TrialState.WAITING else None,
            distributions=None if state == TrialState.WAITING else {k: SPACE[k] for k in params},
            user_attrs=user_attrs,
            system_attrs={"fixed_params": params} if state == TrialState.WAITING else None,
        )
    )
    return study.trials[-1]


def lr(value):
    return {"optimizer.lr": value, "data.batch_size": 32}


@pytest.fixture
def study():
    return optuna.create_study(direction="maximize")


def test_what_counts_what_failed_and_what_was_cut_off(study):
    complete = add(study, TrialState.COMPLETE)
    pruned = add(study, TrialState.PRUNED, lr(0.2))
    diverged = add(study, TrialState.FAIL, lr(0.3), failure_reason="DivergedError: nan")
    killed = add(study, TrialState.FAIL, lr(0.4), interrupted="interrupted")
    crashed = add(study, TrialState.FAIL, lr(0.5))  # failed by a heartbeat: no reason
    running = add(study, TrialState.RUNNING, lr(0.6))
    state = schedule.tally(study.trials)
    assert [t.number for t in state.counted] == [complete.number, pruned.number, diverged.number]
    assert [t.number for t in state.failed] == [diverged.number]
    assert [t.number for t in state.running] == [running.number]
    assert schedule.cut_off(killed) and schedule.cut_off(crashed)
    assert not schedule.cut_off(diverged)
    repeat = add(study, TrialState.FAIL, lr(0.1), interrupted="duplicate")  # never ran
    assert schedule.stepped_aside(repeat) and not schedule.stepped_aside(killed)


def test_asks_for_what_is_missing_up_to_n_jobs(study):
    for value in (0.1, 0.2, 0.3):
        add(study, TrialState.COMPLETE, lr(value))
    add(study, TrialState.RUNNING, lr(0.4))
    add(study, TrialState.FAIL, lr(0.5))  # cut off: does not count
    state = schedule.tally(study.trials)
    assert schedule.to_ask(state, n_trials=10, n_jobs=4) == 4
    assert schedule.to_ask(state, n_trials=6, n_jobs=4) == 2
    assert schedule.to_ask(state, n_trials=4, n_jobs=4) == 0  # the running one may finish
    assert schedule.to_ask(state, n_trials=3, n_jobs=4) == 0


def test_stops_when_more_failed_than_allowed(study):
    add(study, TrialState.FAIL, lr(0.1), failure_reason="DivergedError: nan")
    add(study, TrialState.FAIL, lr(0.2))  # cut off: not a failure of the trial
    state = schedule.tally(study.trials)
    assert schedule.too_many_failures(state, n_trials=4, max_failure_rate=0.25) is None
    assert schedule.too_many_failures(state, n_trials=3, max_failure_rate=0.25) == (
        "1 trials failed, more than hydra.sweeper.max_failure_rate=0.25 of "
        "hydra.sweeper.n_trials=3 allows; the first failed: DivergedError: nan"
    )


def test_a_trial_is_stale_when_its_worker_is_gone_or_never_came(study):
    worker = {"id": "h:1:abc", "pid": 1}
    named = add(study, TrialState.RUNNING, worker=worker)
    orphan = add(study, TrialState.RUNNING, lr(0.2))  # killed between ask() and its name
    start = orphan.datetime_start
    assert schedule.stale(named, alive=False, now=start, grace_period=60)
    assert not schedule.stale(named, alive=None, now=start + timedelta(hours=1), grace_period=60)
    assert not schedule.stale(named, alive=True, now=start, grace_period=60)
    assert not schedule.stale(
        orphan, alive=None, now=start + timedelta(seconds=59), grace_period=60
    )
    assert schedule.stale(orphan, alive=None, now=start + timedelta(seconds=61), grace_period=60)
    done = add(study, TrialState.COMPLETE, lr(0.3))
    assert not schedule.stale(done, alive=False, now=NOW, grace_period=60)


def test_a_trial_past_n_trials_among_the_live_steps_aside(study):
    add(study, TrialState.COMPLETE, lr(0.1))
    add(study, TrialState.FAIL, lr(0.2))  # cut off: not live
    first = add(study, TrialState.RUNNING, lr(0.3))
    second = add(study, TrialState.RUNNING, lr(0.4))  # asked at the same moment elsewhere
    assert not schedule.surplus(first.number, study.trials, n_trials=2)
    assert schedule.surplus(second.number, study.trials, n_trials=2)
    assert not schedule.surplus(second.number, study.trials, n_trials=3)
    # a retry queued by one worker before another asked is the next ask's: it is live
    study.enqueue_trial({"optimizer.lr": 0.5})
    (queued,) = [t for t in study.trials if t.state == TrialState.WAITING]
    third = add(study, TrialState.RUNNING, lr(0.6))
    assert queued.number < third.number
    assert schedule.surplus(third.number, study.trials, n_trials=4)


def test_a_repeat_is_a_configuration_an_earlier_or_finished_trial_holds(study):
    done = add(study, TrialState.COMPLETE, lr(0.1))
    cut = add(study, TrialState.FAIL, lr(0.2))  # cut off: its configuration is free again
    diverged = add(study, TrialState.FAIL, lr(0.3), failure_reason="DivergedError: nan")
    queued = add(study, TrialState.WAITING, lr(0.4))
    repeats = [add(study, TrialState.RUNNING, lr(v)) for v in (0.1, 0.2, 0.3, 0.4, 0.5)]
    assert [schedule.duplicate(t, study.trials) for t in repeats] == [
        True,  # as `done`
        False,  # `cut` ran no further: it runs again
        True,  # a failed configuration is held: it would fail again
        True,  # `queued` will run it
        False,
    ]
    assert not schedule.duplicate(done, study.trials)  # the first of its kind
    assert not schedule.duplicate(queued, study.trials)
    assert cut.number < diverged.number


def test_a_finite_space_lists_its_points_and_what_no_trial_holds(study):
    space = {
        "data.batch_size": BATCH,
        "model.depth": IntDistribution(1, 3),
        "optimizer.lr": FloatDistribution(0.1, 0.3, step=0.1),
    }
    found = sweep_space.points(space)
    assert len(found) == 2 * 3 * 3
    assert {"data.batch_size": 64, "model.depth": 3, "optimizer.lr": pytest.approx(0.3)} in found
    assert sweep_space.points(SPACE) is None  # a continuous lr: infinite
    small = {"data.batch_size": BATCH}
    add(study, TrialState.COMPLETE, {"data.batch_size": 32})
    assert schedule.unheld(sweep_space.points(small), study.trials) == [{"data.batch_size": 64}]
    add(study, TrialState.RUNNING, {"data.batch_size": 64})
    assert schedule.unheld(sweep_space.points(small), study.trials) == []


def test_cut_off_trials_that_ran_run_again_once(study):
    crashed = add(study, TrialState.FAIL, lr(0.1), interrupted="crashed")
    add(study, TrialState.FAIL, lr(0.2), interrupted="surplus")  # never ran
    add(study, TrialState.FAIL, lr(0.3), failure_reason="DivergedError: nan")  # its own fault
    retried = add(study, TrialState.FAIL, lr(0.4))
    add(study, TrialState.WAITING, lr(0.4), retry_of=retried.number)
    again = add(study, TrialState.FAIL, lr(0.5), retry_of=99)  # a retry, cut off in turn
    add(study, TrialState.FAIL, {"optimizer.lr": 0.6})  # killed before it had every value
    due = schedule.retries_due(study.trials, SPACE, n_trials=3)
    assert [t.number for t in due] == [crashed.number]
    assert again.number not in [t.number for t in due]
    # only as many as n_trials has room for: here one waits already
    assert schedule.retries_due(study.trials, SPACE, n_trials=1) == []
    add(study, TrialState.FAIL, lr(0.7), interrupted="interrupted")
    assert len(schedule.retries_due(study.trials, SPACE, n_trials=4)) == 2
    assert len(schedule.retries_due(study.trials, SPACE, n_trials=3)) == 1


def test_each_trial_draws_with_its_own_seed_the_same_in_every_process():
    seeds = [schedule.trial_seed(0, n) for n in range(100)]
    assert len(set(seeds)) == 100
    assert seeds == [schedule.trial_seed(0, n) for n in range(100)]
    assert schedule.trial_seed(1, 0) != seeds[0]
    assert schedule.trial_seed(None, 3) is None  # unseeded: random, as asked
