"""Slots, not batches: under a launcher whose jobs run in processes of their own (joblib
here, a real loky pool), hydra.sweeper.n_jobs trials are in flight and a slot is filled
as soon as its trial ends, not when the slowest trial of a batch has ended; an
interrupted sweep leaves none of its trials' processes behind."""

from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from fashion_sweep.sweeps import workers
from tests.conftest import wait_for
from tests.test_integrity import runs, start, trials

pytestmark = pytest.mark.slow
POOL = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2"]


def idle_seconds(found: list, slots: int) -> float:
    """Slot-seconds left idle while trials were still to start: from the moment every
    slot had started a run (a pool's processes start one after another) to the last
    run's start, each moment fewer than `slots` runs were open."""
    edges = sorted([(r.info.start_time, 1) for r in found] + [(r.info.end_time, -1) for r in found])
    starts = sorted(r.info.start_time for r in found)
    last_start = starts[-1]
    idle, open_, at = 0.0, 0, starts[slots - 1]
    for when, step in edges:
        when = min(max(when, at), last_start)
        idle += max(0, slots - open_) * (when - at) / 1000
        open_, at = open_ + step, when
    return idle


def test_a_slot_is_filled_as_soon_as_its_trial_ends(sweep, tmp_path):
    """Three long trials (batch size 4: 4,000 steps) and three short ones (batch size
    1000: 16 steps) on two slots. Batches of two pair a long trial with a short one at
    least once (three of each), and the short one's slot then idles for the rest of the
    long one; slots fill it with the next trial at once."""
    space = ["data.batch_size=choice(4,1000)", "optimizer.lr=choice(0.01,0.02,0.03)"]
    done = sweep(
        *POOL,
        *space,
        "data.train_size=16000",
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.n_trials=6",
    )
    assert done.returncode == 0, done.stderr[-3000:]

    found = [run for key, run in runs(tmp_path).items() if key != "parent"]
    long = [r for r in found if r.data.params["data.batch_size"] == "4"]
    assert len(long) == 3 and len(found) == 6
    took = {r.info.run_id: (r.info.end_time - r.info.start_time) / 1000 for r in found}
    gap = min(took[r.info.run_id] for r in long) - max(
        took[r.info.run_id] for r in found if r not in long
    )
    idle = idle_seconds(found, slots=2)
    # a batch that pairs a long trial with a short one leaves `gap` idle at least; slots
    # leave a job's hand-over (a few tenths of a second) each time one ends
    assert idle < 0.5 * gap, (idle, gap)


def test_an_interrupted_pooled_sweep_leaves_no_trial_process_and_no_trial_running(seed, tmp_path):
    seed(tmp_path)
    # trials far longer than the wait for the second to start: none ends near the kill
    args = [*POOL, "data.train_size=10000", "trainer.epochs=20", "hydra.sweeper.n_trials=4"]
    process = start(tmp_path, *args, "hydra.sweeper.study_name=stopped")

    def both_training() -> bool:
        running = [t for t in trials(tmp_path, "stopped") if t.state == TrialState.RUNNING]
        return len(running) == 2 and len([k for k in runs(tmp_path) if k != "parent"]) == 2

    wait_for(both_training, "two trials training")
    pool = pool_of(process)
    assert pool, "the trials train in processes of their own"
    os.kill(process.pid, signal.SIGTERM)  # the sweep's process alone: its pool gets nothing
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0, output[-2000:]

    time.sleep(0.5)
    assert not [p.pid for p in pool if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert "Stopped 2 process(es) still running trials of this sweep" in output
    assert "leaked" not in output, output[-3000:]  # joblib shut its pool down (loky's locks)
    assert output.strip().splitlines()[-1] == "error: interrupted: SIGTERM", output[-3000:]
    found = trials(tmp_path, "stopped")
    assert not [t for t in found if t.state == TrialState.RUNNING]
    assert [t.user_attrs.get("interrupted") for t in found] == ["interrupted: SIGTERM"] * 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    statuses = [client.get_run(r.info.run_id).info.status for r in runs(tmp_path).values()]
    assert statuses == ["KILLED"] * 3  # both trials' runs and the sweep's


def pool_of(sweep) -> list[psutil.Process]:
    """The processes the sweep's launcher started for its trials (not loky's resource
    tracker, which carries the sweep's environment too)."""
    return [
        p
        for p in psutil.Process(sweep.pid).children(recursive=True)
        if workers.ENV in environ(p) and "resource_tracker" not in " ".join(p.cmdline())
    ]


def environ(process: psutil.Process) -> dict:
    try:
        return process.environ()
    except psutil.Error:
        return {}


def test_a_trial_whose_process_dies_runs_again_and_the_sweep_goes_on(seed, tmp_path):
    """kill -9 of one of joblib's workers mid-trial (out of memory, say): joblib ends its
    whole pool, so both slots' trials are cut off; each runs again and the sweep ends
    with its n_trials, no traceback."""
    seed(tmp_path)
    args = [*POOL, "data.train_size=10000", "trainer.epochs=6", "hydra.sweeper.n_trials=3"]
    process = start(tmp_path, *args, "hydra.sweeper.study_name=died")

    def training() -> bool:
        return any(t.state == TrialState.RUNNING for t in trials(tmp_path, "died")) and bool(
            [k for k in runs(tmp_path) if k != "parent"]
        )

    wait_for(training, "a trial training")
    (victim, *_) = pool_of(process)
    victim.kill()
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
    # no traceback of the sweep's (loky's resource tracker may print its own KeyErrors
    # for a killed worker's locks: joblib/loky's, scikit-learn#30525)
    frames = re.findall(r'^  File "(.*?)"', output, re.M)
    assert not [f for f in frames if "resource_tracker" not in f], output[-3000:]
    said = re.findall(r"Trial (\d+) was cut off: its process died \((\w+)\)", output)
    assert said and {why for _, why in said} == {"TerminatedWorkerError"}, output[-3000:]

    found = trials(tmp_path, "died")
    cut = [t for t in found if t.user_attrs.get("interrupted") == "its process died"]
    assert sorted(t.number for t in cut) == sorted(int(n) for n, _ in said)
    retried = sorted(t.user_attrs["retry_of"] for t in found if "retry_of" in t.user_attrs)
    assert retried == sorted(t.number for t in cut)
    counted = [t for t in found if t.state == TrialState.COMPLETE]
    assert len(counted) == 3 and not [t for t in found if t.state == TrialState.RUNNING]
    mlflow = runs(tmp_path)
    began = [mlflow[t.number] for t in cut if t.number in mlflow]  # the other may not have
    assert began and {r.info.status for r in began} == {"KILLED"}
    assert {r.data.tags["failure_reason"] for r in began} == {"its process died"}
    assert mlflow["parent"].info.status == "FINISHED"
