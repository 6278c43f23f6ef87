"""Whether a worker is alive: real processes, a real SQLite study with heartbeats."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from fashion_sweep.sweeps import workers
from fashion_sweep.sweeps.study import quiet


def identity_of(pid: int) -> dict:
    """The `worker` attr that process `pid` would have written, taken from outside."""
    return {**workers.me(), "id": f"other:{pid}", "pid": pid, "started": workers._start_time(pid)}


@pytest.mark.skipif(workers._kernel() is None, reason="needs Linux /proc")
def test_a_worker_is_alive_while_its_process_is_and_not_after():
    assert workers.alive(workers.me()) is True
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        worker = identity_of(child.pid)
        assert workers.alive(worker) is True
    finally:
        child.kill()
        child.wait()
    assert workers.alive(worker) is False
    # its pid now held by another process (pid reuse): a different start, so gone
    assert workers.alive({**identity_of(os.getppid()), "started": 1}) is False


def test_a_worker_elsewhere_is_left_to_its_heartbeat():
    elsewhere = {**workers.me(), "id": "x:1:y", "pid": 1, "kernel": "another-boot/pid:[1]"}
    assert workers.alive(elsewhere) is None
    assert workers.alive({**elsewhere, "kernel": None}) is None
    assert workers.alive("oldhost:1234") is None  # a worker attr from an earlier version
    assert workers.name("oldhost:1234") == "none yet" and workers.name(workers.me())


def test_a_trial_whose_heartbeats_stop_is_failed_after_the_grace_period(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    stale = []
    storage = quiet(
        optuna.storages.RDBStorage,
        f"sqlite:///{tmp_path / 'optuna.db'}",
        heartbeat_interval=1,
        grace_period=2,
        heartbeat_stale_trial_callback=lambda _, trial: stale.append(trial.number),
    )
    held = optuna.create_study(storage=storage)
    beating, silent = quiet(held.ask), quiet(held.ask)
    study_id = storage.get_study_id_from_name(held.study_name)
    ids = {
        t.number: storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        for t in (beating, silent)
    }
    heartbeats = workers.Heartbeats(storage.record_heartbeat, interval=1)
    heartbeats.add(ids[beating.number])
    heartbeats.add(ids[silent.number])  # its first beat: a sign of life at once
    heartbeats.discard(ids[silent.number])  # then nothing: its worker died
    time.sleep(3.5)
    quiet(optuna.storages.fail_stale_trials, held)
    heartbeats.stop()
    states = {t.number: t.state for t in held.trials}
    assert states == {beating.number: TrialState.RUNNING, silent.number: TrialState.FAIL}
    assert stale == [silent.number]
