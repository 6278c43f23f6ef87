"""A sweep on a bad day, with real stores: workers started together, Ctrl-C, kill -9 and
a resume in a fresh PID namespace or under another hostname, kill -9 of a joblib sweep
whose workers would train on, a kill right after asking for a trial (real processes,
for what a process is for; the resumes that need none run in this process), a study
name reused for another sweep."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from fashion_sweep.sweeps import schedule, workers
from tests.conftest import DATA, TINY, wait_for

pytestmark = pytest.mark.slow
# a trial long enough to be caught in the middle: 10,000 images, 2 epochs
LONG = ["data.train_size=10000", "trainer.epochs=2"]
QUICK_DEATH = ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3"]
ROOT = os.geteuid() == 0 and shutil.which("unshare") is not None


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fashion_sweep.train", "-m", f"data.root={DATA}", *TINY, *args]


def start(cwd: Path, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """A sweep in its own session (a terminal's Ctrl-C reaches its whole group)."""
    return subprocess.Popen(
        [*prefix, *command(*args)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def trials(cwd: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd / 'optuna.db'}").trials
    except (KeyError, ValueError, RuntimeError):  # not created yet
        return []


def runs(cwd: Path) -> dict:
    """The sweep's MLflow runs: {"parent": run, trial number: run}."""
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fashion_sweep")
    found = client.search_runs([experiment.experiment_id], max_results=1000)
    by = {int(r.data.tags["trial"]): r for r in found if "trial" in r.data.tags}
    (by["parent"],) = [r for r in found if r.data.tags["fashion_sweep.kind"] == "sweep"]
    return by


def configs(found: list) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in found]


def check_resumed(cwd: Path, name: str, n_trials: int, cut: int) -> None:
    """After a resume: n_trials counted and complete, no repeats, the cut-off trial's
    configuration run again, every MLflow run ended as its trial did."""
    after = trials(cwd, name)
    assert not [t for t in after if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    counted = [t for t in after if schedule.counts(t)]
    assert len(counted) == n_trials and all(t.state == TrialState.COMPLETE for t in counted)
    assert len(set(configs(counted))) == n_trials  # no configuration ran twice
    assert schedule.cut_off(after[cut])
    (retry,) = [t for t in after if t.user_attrs.get("retry_of") == cut]
    assert retry.params == after[cut].params and retry.state == TrialState.COMPLETE
    mlflow = runs(cwd)
    assert mlflow["parent"].info.status == "FINISHED"
    assert "failure_reason" not in mlflow["parent"].data.tags  # from the interruption
    assert mlflow[cut].info.status == "KILLED"
    for t in counted:
        assert mlflow[t.number].info.status == "FINISHED"
        assert mlflow[t.number].info.run_id == t.user_attrs["mlflow_run_id"]


def test_workers_started_together_draw_distinct_trials_into_their_own_folders(tmp_path, data_root):
    args = ["hydra.sweeper.study_name=together", "hydra.sweeper.n_trials=4"]
    procs = [start(tmp_path, *args) for _ in range(3)]  # the same second, the same folder
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(outputs)[-3000:]

    found = trials(tmp_path, "together")
    counted = [t for t in found if schedule.counts(t)]
    assert len(counted) == 4 and all(t.state == TrialState.COMPLETE for t in counted)
    assert len(set(configs(counted))) == 4
    ran = [t for t in found if t.user_attrs.get("interrupted") not in schedule.NOT_RUN]
    folders = sorted(tmp_path.glob("multirun/*/*/*/.hydra"))
    numbers = [OmegaConf.load(f / "overrides.yaml") for f in folders]
    numbers = [
        int(next(o for o in lines if o.startswith("tracking.trial="))[15:]) for lines in numbers
    ]
    assert sorted(numbers) == sorted(t.number for t in ran)  # a folder each, none shared
    assert [f.parent.name for f in folders] == [str(n) for n in numbers]
    results = list(tmp_path.glob("multirun/*/*/optimization_results.yaml"))
    assert len(results) == 3  # each worker its own sweep folder
    assert len({OmegaConf.load(r).best_trial for r in results}) == 1
    # each worker says the trials it ran, counted in the study: 1 to 4 once in all
    said = [re.findall(r"^\[(\d)/4\] trial (\d) ", out, re.M) for out in outputs]
    assert sorted(int(n) for lines in said for n, _ in lines) == [1, 2, 3, 4], outputs
    assert sorted(int(t) for lines in said for _, t in lines) == [t.number for t in counted]


@pytest.mark.parametrize("launcher", ["basic", "joblib", "packed"])
def test_ctrl_c_keeps_finished_trials_and_the_resume_runs_what_was_cut_off(
    sweep, seed, tmp_path, launcher
):
    """Packed: a continuous pack of one slot, trial 1 joining it as trial 0 ends, is
    interrupted while trial 1 trains."""
    slots = 1 if launcher == "packed" else 2
    args = [*LONG, "hydra.sweeper.study_name=ctrl-c", f"hydra.sweeper.n_jobs={slots}"]
    args += [f"hydra/launcher={launcher}"]
    args += ["hydra.launcher.n_jobs=1"] if launcher == "joblib" else []  # one job after another
    seed(tmp_path)
    process = start(tmp_path, *args, "hydra.sweeper.n_trials=3")

    def second_running() -> bool:
        states = [t.state for t in trials(tmp_path, "ctrl-c")]
        if states[:2] != [TrialState.COMPLETE, TrialState.RUNNING]:
            return False
        return runs(tmp_path).get(1) is not None  # its MLflow run has started

    wait_for(second_running, "trial 0 done and trial 1 running")
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the sweep's terminal
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0, output[-2000:]

    before = trials(tmp_path, "ctrl-c")
    assert before[0].state == TrialState.COMPLETE  # it returned: recorded as it was
    assert before[1].state == TrialState.FAIL and before[1].user_attrs["interrupted"]
    mlflow = runs(tmp_path)
    assert mlflow[0].info.status == "FINISHED"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "model.pth" in {a.path for a in client.list_artifacts(mlflow[0].info.run_id)}
    assert mlflow[1].info.status == "KILLED"
    assert mlflow["parent"].info.status == "KILLED"

    done = sweep(*args, "hydra.sweeper.n_trials=4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Trial 1 was cut off: its configuration runs again" in done.stderr + done.stdout
    check_resumed(tmp_path, "ctrl-c", n_trials=4, cut=1)
    assert trials(tmp_path, "ctrl-c")[0].params == before[0].params


def test_an_interruption_inside_an_ask_cuts_that_trial_off_and_the_resume_runs_it_at_once(
    sweep, tmp_path, monkeypatch
):
    """Ctrl-C while Optuna draws a round's third trial (inside its ask): that trial, not
    yet the worker's, is cut off too, so the resume runs it again without waiting for
    it as another worker's (grace_period, 60 s)."""
    from fashion_sweep.sweeps.sampler import PerTrialSeed

    draw = PerTrialSeed.sample_independent

    def interrupted(self, study, trial, name, distribution):
        if trial.number == 2:
            raise KeyboardInterrupt
        return draw(self, study, trial, name, distribution)

    args = ["hydra/launcher=packed", "hydra.sweeper.n_jobs=4", "hydra.sweeper.n_trials=4"]
    args += ["hydra.sweeper.study_name=in-ask"]
    monkeypatch.setattr(PerTrialSeed, "sample_independent", interrupted)
    with pytest.raises(KeyboardInterrupt):  # in this process: as the command's Ctrl-C
        sweep(*args)
    before = trials(tmp_path, "in-ask")
    assert [t.state for t in before] == [TrialState.FAIL] * 3  # two asked, one in its ask
    assert before[2].user_attrs["interrupted"] == "interrupted"
    monkeypatch.setattr(PerTrialSeed, "sample_independent", draw)
    started = time.monotonic()
    done = sweep(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Waiting for trials of other workers" not in done.stdout + done.stderr
    assert time.monotonic() - started < 30  # not the 60 s grace period
    counted = [t for t in trials(tmp_path, "in-ask") if schedule.counts(t)]
    assert len(counted) == 4 and all(t.state == TrialState.COMPLETE for t in counted)


@pytest.mark.skipif(not ROOT, reason="needs root and unshare")
@pytest.mark.parametrize(
    "where",
    [
        # a restarted container: another PID namespace, where the dead worker's pid is
        # someone else's (or ours)
        ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"],
        # the same machine under another name
        ["unshare", "--uts", "sh", "-c", 'hostname renamed && exec "$@"', "-"],
    ],
    ids=["fresh-pid-namespace", "another-hostname"],
)
def test_killed_sweep_resumes_anywhere_without_waiting_forever(tmp_path, seed, where):
    args = [*LONG, *QUICK_DEATH, "hydra.sweeper.study_name=killed", "hydra.sweeper.n_trials=2"]
    seed(tmp_path)
    sweep = start(tmp_path, *args)

    def mid_trial() -> bool:
        found = trials(tmp_path, "killed")
        return bool(found) and found[0].state == TrialState.RUNNING and runs(tmp_path).get(0)

    wait_for(mid_trial, "trial 0 running")
    sweep.kill()  # kill -9: nothing of the sweep's own cleanup runs
    sweep.communicate()
    assert trials(tmp_path, "killed")[0].state == TrialState.RUNNING

    resumed = subprocess.run(
        [*where, *command(*args)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = resumed.stderr + resumed.stdout
    assert "Trial 0 (worker " in said and "was cut off: marked failed" in said
    check_resumed(tmp_path, "killed", n_trials=2, cut=0)


# issue 22's sweep: two trials at a time in joblib's worker processes, a quick heartbeat
ORPHANS = [
    "hydra/launcher=joblib",
    "hydra.launcher.n_jobs=2",
    "hydra.sweeper.n_jobs=2",
    "hydra.sweeper.n_trials=4",
    "hydra.sweeper.study_name=orphans",
    "hydra.sweeper.heartbeat_interval=2",
    "hydra.sweeper.grace_period=4",
    "data.train_size=5000",
    "trainer.epochs=16",  # long enough to train on past a resume's start
]
MARGIN = 5.0  # s: an interrupted trial ends its run, its process exits (on a busy CPU)


def descendants(pid: int) -> dict[int, int]:
    """The processes under `pid`, each with its start time (its pid reused is not it)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if not entry.name.isdigit():
            continue  # self, thread-self
        parents[int(entry.name)] = (int(fields[1]), int(fields[19]))
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, started) in parents.items():
            if ppid == parent and child not in found:
                found[child] = started
                todo.append(child)
    return found


def trial_runs(cwd: Path) -> list:
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fashion_sweep")
    if experiment is None:
        return []
    found = client.search_runs([experiment.experiment_id], "tags.trial != ''", max_results=1000)
    return [r for r in found if "trial" in r.data.tags]


def kill_mid_epoch(cwd: Path, *args: str) -> tuple[dict[int, int], float]:
    """A sweep killed with -9 once two of its trials are past their first epoch: the
    processes it had started (each with its start time), and when it was killed."""
    log = (cwd / "first.txt").open("w")
    first = subprocess.Popen(
        command(*args), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )

    def second_epoch() -> bool:
        found = [r for r in trial_runs(cwd) if r.info.status == "RUNNING"]
        return len(found) == 2 and all("train/loss" in r.data.metrics for r in found)

    wait_for(second_epoch, "two trials past their first epoch", timeout=120)
    under = descendants(first.pid)  # the launcher's processes
    first.kill()  # kill -9: the sweep's process alone; what it started is left
    first.wait()
    return under, time.monotonic()


@contextlib.contextmanager
def watching(under: dict[int, int], killed: float) -> Iterator[Callable]:
    """The killed sweep's processes watched for 2 s (its heartbeat) + MARGIN by the
    callable yielded, which returns those that outlived the watch and when each of the
    others ended; whatever is left of them is killed when the block ends."""
    lasted: dict[int, float] = {}

    def watch() -> tuple[list[int], dict[int, float]]:
        while len(lasted) < len(under) and time.monotonic() - killed < 2 + MARGIN:
            for pid, started in under.items():
                if pid not in lasted and workers._start_time(pid) != started:
                    lasted[pid] = round(time.monotonic() - killed, 1)
            time.sleep(0.1)
        return [pid for pid in under if pid not in lasted], lasted

    try:
        yield watch
    finally:
        for pid, started in under.items():  # what the test started ends with it
            if workers._start_time(pid) == started:
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(workers._kernel() is None, reason="needs Linux /proc")
@pytest.mark.parametrize("resume", ["at-once", "late"])
def test_a_killed_joblib_sweep_leaves_no_trial_training_and_no_late_result(tmp_path, seed, resume):
    """kill -9 of a joblib sweep's process in its trials' second epoch (issue 22): its
    workers stop within a heartbeat, their runs KILLED as the sweep ends them, and a
    resume at once beside them, or late, once none of their runs is RUNNING (before the
    fix: once they had trained to the end), completes the study with each
    configuration's result recorded once and no record rewritten."""
    seed(tmp_path)
    under, killed = kill_mid_epoch(tmp_path, *ORPHANS, "data.loader=torch")  # slow enough
    # the resume is quick: the study does not depend on the loader
    again = command(*ORPHANS, "data.loader=resident")
    resume_now = functools.partial(
        subprocess.Popen, again, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    with watching(under, killed) as watch:
        resumed = resume_now(text=True) if resume == "at-once" else None
        survivors, lasted = watch()
        if resumed is None:
            wait_for(
                lambda: all(r.info.status != "RUNNING" for r in trial_runs(tmp_path)),
                "the killed sweep's runs ended",
                timeout=120,
            )
            resumed = resume_now(text=True)
        said = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, said[-3000:]

    found = trials(tmp_path, "orphans")
    assert not [t for t in found if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    counted = [t for t in found if schedule.counts(t)]
    assert len(counted) == 4 and all(t.state == TrialState.COMPLETE for t in counted)
    assert len(set(configs(counted))) == 4
    after = trial_runs(tmp_path)
    ended = {
        r.data.tags["trial"]: (r.info.status, r.data.tags.get("failure_reason")) for r in after
    }
    for run in after:  # nothing the sweep ended is FINISHED afterwards
        if run.data.tags.get("failure_reason", "").startswith("interrupted"):
            assert run.info.status in ("KILLED", "FAILED"), ended
    finished = [r for r in after if r.info.status == "FINISHED"]
    # each configuration's result once: the counted trials' runs, and no other
    assert sorted(r.info.run_id for r in finished) == sorted(
        t.user_attrs["mlflow_run_id"] for t in counted
    ), ended
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for run in finished:  # each with every epoch's metrics and its model
        history = client.get_metric_history(run.info.run_id, "val/accuracy")
        assert sorted(m.step for m in history) == list(range(1, 17))
        assert "model.pth" in {a.path for a in client.list_artifacts(run.info.run_id)}
    for trial in found:
        if schedule.cut_off(trial) and trial.user_attrs.get("interrupted") == "crashed":
            (run,) = [r for r in after if r.data.tags["trial"] == str(trial.number)]
            assert run.info.status == "KILLED", ended
            assert run.data.tags["failure_reason"] == workers.DEAD_WORKER
    assert not survivors, f"alive {2 + MARGIN} s after the kill: {survivors}; ended: {lasted}"


@pytest.mark.skipif(workers._kernel() is None, reason="needs Linux /proc")
def test_a_killed_submitit_sweeps_tasks_stop_with_it(tmp_path, seed):
    """submitit's local executor: each trial a task under a controller process of its
    own, both left behind by kill -9 of the sweep's process. The task stops within a
    heartbeat, its run KILLED as a resume would end it, and its controller ends with it.
    (What a resume then does is the joblib test's.)"""
    seed(tmp_path)
    args = [a for a in ORPHANS if "launcher" not in a] + ["launcher=local", "data.loader=torch"]
    under, killed = kill_mid_epoch(tmp_path, *args)
    with watching(under, killed) as watch:
        survivors, lasted = watch()
    assert len(under) == 4  # two controllers, a task under each
    runs = trial_runs(tmp_path)
    assert [(r.info.status, r.data.tags.get("failure_reason")) for r in runs] == [
        ("KILLED", workers.DEAD_WORKER)
    ] * 2
    assert not survivors, f"alive {2 + MARGIN} s after the kill: {survivors}; ended: {lasted}"


def test_a_trial_its_study_ended_elsewhere_stops_at_its_next_epoch(sweep, tmp_path):
    """A worker on another host found this one's heartbeat silent (a network cut) and
    cut its trial off, as a resume does: the trial, trained here, stops at its next
    epoch with its run left as that worker ended it, and its configuration runs again."""
    args = ["data.train_size=2000", "trainer.epochs=30", "hydra.sweeper.n_trials=1"]
    args += ["hydra.sweeper.study_name=elsewhere"]
    ended = []

    def elsewhere() -> None:
        def training() -> bool:
            found = trial_runs(tmp_path)
            return bool(found) and "train/loss" in found[0].data.metrics

        wait_for(training, "trial 0 past its first epoch", timeout=120)
        (run,) = trial_runs(tmp_path)
        assert run.info.status == "RUNNING", "trial 0 ended before it was cut off"
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
        study_id = storage.get_study_id_from_name("elsewhere")
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, 0)
        storage.set_trial_user_attr(trial_id, schedule.CUT_OFF, "crashed")
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        client.set_tag(run.info.run_id, "failure_reason", "interrupted: its heartbeat stopped")
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)

    thread = threading.Thread(target=elsewhere, daemon=True)
    thread.start()
    done = sweep(*args)
    thread.join(timeout=10)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ended, "trial 0 ended before it was cut off"

    found = trials(tmp_path, "elsewhere")
    assert schedule.cut_off(found[0]) and found[0].user_attrs["interrupted"] == "crashed"
    (retry,) = [t for t in found if t.user_attrs.get("retry_of") == 0]
    assert retry.params == found[0].params and retry.state == TrialState.COMPLETE
    assert [t for t in found if schedule.counts(t)] == [retry]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(ended[0])
    assert run.info.status == "KILLED"
    assert run.data.tags["failure_reason"] == "interrupted: its heartbeat stopped"
    epochs = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert len(epochs) < 30 and not client.list_artifacts(run.info.run_id, "model.pth")
    finished = [r.info.run_id for r in trial_runs(tmp_path) if r.info.status == "FINISHED"]
    assert finished == [retry.user_attrs["mlflow_run_id"]]


WORKER_DIES = """
import os, signal, sys
import optuna
from mlflow.tracking import MlflowClient
from fashion_sweep.sweeps import workers

study = optuna.load_study(study_name="orphan", storage="sqlite:///optuna.db")
study.ask()  # killed right after asking: no worker, no heartbeat, no values
space = study.trials[0].distributions
trial = study.ask(space)  # a trial that ran to the end of its MLflow run ...
trial.set_user_attr("worker", workers.me())
client = MlflowClient("sqlite:///mlflow.db")
parent = study.user_attrs["mlflow_parent_run_id"]
run = client.create_run(
    client.get_run(parent).info.experiment_id,
    tags={"mlflow.parentRunId": parent, "trial": str(trial.number), "fashion_sweep.kind": "train"},
)
client.log_metric(run.info.run_id, "val/accuracy", 0.625)
client.set_terminated(run.info.run_id, "FINISHED")
print(run.info.run_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # ... and was killed before recording it
"""


def test_a_worker_killed_after_asking_or_after_its_run_does_not_stall_or_lose_it(sweep, tmp_path):
    args = [*QUICK_DEATH, "hydra.sweeper.study_name=orphan"]
    first = sweep(*args, "hydra.sweeper.n_trials=1")
    assert first.returncode == 0, first.stderr[-3000:]
    died = subprocess.run(
        [sys.executable, "-c", WORKER_DIES], cwd=tmp_path, capture_output=True, text=True
    )
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    run_id = died.stdout.strip()
    assert [t.state for t in trials(tmp_path, "orphan")[1:]] == [TrialState.RUNNING] * 2

    started = time.monotonic()
    done = sweep(*args, "hydra.sweeper.n_trials=3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - started < 120
    found = trials(tmp_path, "orphan")
    assert found[1].state == TrialState.FAIL and found[1].user_attrs["interrupted"] == "crashed"
    assert (found[2].state, found[2].value) == (TrialState.COMPLETE, 0.625)  # as its run ended
    assert found[2].user_attrs["mlflow_run_id"] == run_id
    assert not [t for t in found if "retry_of" in t.user_attrs]
    assert sum(schedule.counts(t) for t in found) == 3 and len(found) == 4
    assert not [t for t in found if t.state == TrialState.RUNNING]


def test_a_study_name_reused_for_another_sweep_is_refused_before_any_trial(sweep, tmp_path):
    name = "hydra.sweeper.study_name=reused"
    first = sweep(name, "hydra.sweeper.n_trials=1")
    assert first.returncode == 0, first.stderr[-3000:]
    # one command that changes all three: the refusal names each difference
    changes = {
        "model.width=64": "config.model.width: 512 -> 64",
        "data.batch_size=choice(16,32)": "space.data.batch_size: CategoricalDistribution",
        "hydra.sweeper.sampler.seed=1": "sampler.seed: 0 -> 1",
    }
    refused = sweep(name, *changes, "hydra.sweeper.n_trials=2")
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: hydra.sweeper.study_name=reused holds another sweep (")
    assert all(named in last for named in changes.values()), last
    assert "Traceback" not in refused.stderr
    assert len(trials(tmp_path, "reused")) == 1
    assert runs(tmp_path)["parent"].info.status == "FINISHED"
