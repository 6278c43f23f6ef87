"""Whether a worker is alive, and a trial's process that outlives its sweep worker:
real processes, a real SQLite study with heartbeats."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    worker = identity_of(zombie.pid)
    while Path(f"/proc/{zombie.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        time.sleep(0.05)  # ended, not yet reaped by its parent
    assert workers.alive(worker) is False
    zombie.wait()
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


# A launcher's worker process: a job's block, then idle, waiting for its next job (as
# joblib's workers do, whatever the last one raised); `job` or `idle` says when the sweep
# worker dies.
TRIAL = """
import sys, time
from fashion_sweep import signals
from fashion_sweep.sweeps import workers
try:
    with signals.interrupts(), workers.watched():
        try:
            print("job", flush=True)
            time.sleep(0 if sys.argv[1] == "idle" else 60)
        except KeyboardInterrupt as stop:  # where run.run_epochs ends its runs
            print(signals.reason(stop), flush=True)
            raise
except KeyboardInterrupt:
    pass  # sent back to the sweep's process, which is gone
print("idle", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(workers._kernel() is None, reason="needs Linux /proc")
@pytest.mark.parametrize("when", ["job", "idle"])
def test_a_trials_process_stops_once_its_sweep_worker_is_gone(when):
    sweep = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    env = {**os.environ, workers.ENV: json.dumps(identity_of(sweep.pid))}
    trial = subprocess.Popen(
        [sys.executable, "-c", TRIAL, when], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert trial.stdout.readline() == "job\n"
        if when == "idle":
            assert trial.stdout.readline() == "idle\n"
        time.sleep(1.5)  # watched, and left alone while its sweep worker lives
        assert trial.poll() is None
        sweep.kill()
        sweep.wait()
        gone = time.monotonic()
        rest = trial.communicate(timeout=30)[0]
        lasted = time.monotonic() - gone
    finally:
        for process in (sweep, trial):
            process.kill()
            process.wait()
    assert trial.returncode == 128 + signal.SIGTERM
    assert lasted < workers.WATCH_SECONDS + 1.5, lasted
    said = rest.splitlines()  # the job's runs ended first; then, at most, idle a moment
    assert said in (
        ([workers.DEAD_WORKER], [workers.DEAD_WORKER, "idle"]) if when == "job" else ([],)
    )


def test_a_job_in_the_sweeps_own_process_or_out_of_sight_is_not_watched(monkeypatch):
    monkeypatch.delenv(workers.ENV, raising=False)
    assert workers.launcher() is None  # a single run, a plain multirun
    with workers.handed_down():  # the basic and packed launchers: the sweep's own process
        assert json.loads(os.environ[workers.ENV]) == workers.me()
        assert workers.launcher() is None
    assert workers.ENV not in os.environ
    elsewhere = {**workers.me(), "id": "x:1:y", "kernel": "another-boot/pid:[1]"}
    monkeypatch.setenv(workers.ENV, json.dumps(elsewhere))
    assert workers.launcher() is None  # left to its study (pruning.ended_elsewhere)
