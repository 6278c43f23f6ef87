"""Our sweeper for any Hydra app (docs/any-app.md): tests/any_app/app.py knows nothing of
fashion_sweep but `fashion_sweep.sweeps.pruning.report`, and selects hydra/sweeper=study.
Each sweep runs as its user runs it, in a process of its own."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from fashion_sweep.sweeps.settings import SweepError

APP = Path(__file__).parent / "any_app" / "app.py"


def sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(APP), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    return subprocess.run(
        [*command, *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )


def until(storage: str, ready, timeout: float = 120) -> None:
    """Waits until the study's trials are `ready` (a test's moment to send a signal)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        with contextlib.suppress(Exception):  # the study not made yet
            if ready(optuna.load_study(study_name="quadratic", storage=storage).get_trials()):
                return


def test_another_apps_trials_are_pruned_through_the_one_reporting_call(tmp_path):
    done = sweep(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="quadratic", storage=f"sqlite:///{tmp_path}/study.db")
    trials = study.get_trials()
    assert len(trials) == 10 and all(t.state.is_finished() for t in trials)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned and complete  # the median pruner stopped some, after the first 3
    for t in pruned:  # stopped at the step it reported last, which the study records
        assert t.user_attrs["pruned"] == max(t.intermediate_values) < 4
    for t in complete:  # the task's return is the value; each step was reported
        assert sorted(t.intermediate_values) == [1, 2, 3, 4]
        assert t.value == pytest.approx((t.params["x"] - 2) ** 2 + 1 / 4)
    assert "pruned after epoch" in done.stdout
    results = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    assert results.best_value == study.best_value
    assert results.best_params == study.best_params
    assert (tmp_path / "sweep" / "plots" / "sweep.html").is_file()
    assert (tmp_path / "sweep" / "plots" / "optimization_history.png").is_file()
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow for an app without it
    # the same command with more trials continues the study, in the same folder
    again = sweep(tmp_path, "hydra.sweeper.n_trials=12")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(study.get_trials()) == 12
    assert OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml").finished == 12
    # each trial's folder is its number, unique in the study, not Hydra's job number
    folders = [int(p.name) for p in (tmp_path / "sweep").iterdir() if p.name.isdigit()]
    assert sorted(folders) == list(range(12))


def test_another_app_prunes_through_optunas_own_trial_api(tmp_path):
    done = sweep(tmp_path, "trial_api=true")
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="quadratic", storage=f"sqlite:///{tmp_path}/study.db")
    states = [t.state for t in study.get_trials()]
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states
    assert "Error executing job" not in done.stderr  # a pruned trial is no error
    assert "pruned after epoch" in done.stdout


def test_another_apps_trials_in_joblib_workers_and_folders_of_their_own_report(tmp_path):
    # hydra.job.chdir=true: the study's relative sqlite:///study.db is still the sweep's
    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.job.chdir=true"]
    done = sweep(tmp_path, *joblib, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2")
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="quadratic", storage=f"sqlite:///{tmp_path}/study.db")
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.intermediate_values for t in trials)
    assert not list(tmp_path.glob("sweep/*/study.db"))
    # two objectives: reported values are not sent (Optuna cannot take them), nothing is
    # pruned, and the front is the answer
    two = ["objectives=2", "hydra.sweeper.direction=[minimize,minimize]"]
    both = sweep(
        tmp_path,
        *joblib,
        *two,
        "hydra/sweeper/pruner=none",
        "hydra.sweeper.study_name=two",
        "hydra.sweeper.n_trials=6",
    )
    assert both.returncode == 0, both.stderr[-3000:]
    front = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml").solutions
    held = optuna.load_study(study_name="two", storage=f"sqlite:///{tmp_path}/study.db")
    assert sorted(s.trial for s in front) == sorted(t.number for t in held.best_trials)
    assert all(len(s["values"]) == 2 for s in front)


def test_an_app_that_logs_to_mlflow_opts_in_to_a_parent_run_and_a_run_per_trial(tmp_path):
    done = sweep(
        tmp_path,
        "hydra.sweeper.app=fashion_sweep.sweeps.apps.MlflowApp",
        "log_to_mlflow=true",
        "hydra.job.chdir=true",  # each job in its own folder: the store is still the sweep's
        "hydra.sweeper.n_trials=8",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="quadratic", storage=f"sqlite:///{tmp_path}/study.db")
    trials = study.get_trials()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (parent,) = client.search_runs(["0"], "tags.`fashion_sweep.kind` = 'sweep'")
    children = client.search_runs(["0"], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(client.search_runs(["0"])) == 1 + len(trials) == 9  # the app made none else
    by_id = {c.info.run_id: c for c in children}
    for t in trials:  # the app's own records and ours, in one run per trial
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["trial"] == str(t.number)
        assert run.data.params["steps"] == "4"  # the app's param
        assert float(run.data.params["x"]) == pytest.approx(t.params["x"])  # the sweep's
        assert run.data.metrics["loss"] == t.intermediate_values[max(t.intermediate_values)]
        if t.state == TrialState.COMPLETE:
            assert run.data.metrics["value"] == t.value
        else:  # pruned: the app's `with mlflow.start_run()` ended it FAILED, we did not
            assert t.state == TrialState.PRUNED and "value" not in run.data.metrics
            assert run.data.tags["pruned"] == str(t.user_attrs["pruned"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_run_id"] == study.best_trial.user_attrs["mlflow_run_id"]
    assert parent.data.metrics["value"] == study.best_value
    assert "Error executing job" not in done.stderr  # a pruned trial is no error


def test_another_apps_sweep_killed_9_goes_on_where_it_stopped(tmp_path):
    command = [sys.executable, str(APP), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    slow = [
        *command,
        "step_seconds=0.1",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.pruner.n_startup_trials=100",
    ]
    process = subprocess.Popen(
        slow,
        cwd=tmp_path,
        start_new_session=True,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    storage = f"sqlite:///{tmp_path}/study.db"
    until(  # killed while a trial runs, after one finished
        storage,
        lambda trials: (
            TrialState.COMPLETE in [t.state for t in trials]
            and trials[-1].state == TrialState.RUNNING
        ),
    )
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    cut = optuna.load_study(study_name="quadratic", storage=storage).get_trials()[-1]
    assert cut.state == TrialState.RUNNING  # as kill -9 left it
    again = subprocess.run(slow, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = optuna.load_study(study_name="quadratic", storage=storage).get_trials()
    assert all(t.state.is_finished() for t in trials)
    assert trials[cut.number].state == TrialState.FAIL  # cut off, and run again once
    rerun = [t for t in trials if t.params == cut.params and t.number != cut.number]
    assert [t.state for t in rerun] == [TrialState.COMPLETE]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 6  # n_trials, counted
    # the killed worker's claim on the folder is taken over: the answer is where it was
    assert (tmp_path / "sweep" / "optimization_results.yaml").is_file()
    assert not (tmp_path / "sweep-1").exists()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "SIGTERM"])
def test_another_apps_trials_in_joblib_workers_do_not_outlive_their_sweep(tmp_path, how):
    command = [sys.executable, str(APP), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    command += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2"]
    command += ["step_seconds=0.5", "steps=100", "hydra.sweeper.pruner.n_startup_trials=100"]
    with open(tmp_path / "stderr.txt", "w") as stderr:  # a pipe would wait for every child
        process = subprocess.Popen(
            command, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr
        )
    storage = f"sqlite:///{tmp_path}/study.db"
    # both trials training in joblib's workers
    until(storage, lambda trials: sum(bool(t.intermediate_values) for t in trials) == 2)
    os.kill(process.pid, how)  # the sweep alone: its workers are left to notice
    process.wait(timeout=60)
    err = (tmp_path / "stderr.txt").read_text()
    gone = time.monotonic() + 30
    while time.monotonic() < gone:  # every process of the sweep's session ends
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("a trial's process outlived its sweep")
    trials = optuna.load_study(study_name="quadratic", storage=storage).get_trials()
    if how == signal.SIGTERM:  # its trials cut off, to run again; the end said in one line
        assert process.returncode == -signal.SIGTERM
        assert err.strip().splitlines()[-1] == "error: interrupted: SIGTERM"
        assert [t.user_attrs.get("interrupted") for t in trials] == ["interrupted: SIGTERM"] * 2


def test_ctrl_c_keeps_the_trials_another_app_finished_in_the_running_batch(tmp_path):
    command = [sys.executable, str(APP), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    command += ["step_seconds=0.4", "hydra.sweeper.pruner.n_startup_trials=100"]
    process = subprocess.Popen(  # the basic launcher: a batch of n_jobs=2, one by one
        command,
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    storage = f"sqlite:///{tmp_path}/study.db"
    # the batch's first trial done, its second running
    until(storage, lambda trials: any(t.state == TrialState.COMPLETE for t in trials))
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=60)
    trials = optuna.load_study(study_name="quadratic", storage=storage).get_trials()
    assert [t.state for t in trials[:2]] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[1].user_attrs["interrupted"] == "interrupted"


def test_a_task_that_returns_no_number_fails_its_trial_saying_so(tmp_path):
    done = sweep(
        tmp_path,
        "give_nothing=true",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.max_failure_rate=1",
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "no trial completed: 2 failed, 0 pruned, of 2 finished; the first failed: the "
        "task returned None, not a number"
    )


@pytest.mark.parametrize(
    "overrides, said",
    [
        (
            ["hydra.sweeper.direction=[minimize,minimize]"],
            "hydra.sweeper.pruner: Optuna cannot prune a multi-objective study "
            "(value_0, value_1); use hydra/sweeper/pruner=none",
        ),
        (
            ["hydra.sweeper.confirm.top_k=2"],
            "hydra.sweeper.confirm.seed_key: name the key the app seeds its runs with "
            "(e.g. seed), which each confirmation run gets anew",
        ),
        (
            ["hydra.sweeper.confirm.top_k=2", "hydra.sweeper.confirm.seed_key=seed"],
            "hydra.sweeper.confirm.seed_key=seed is not a key of the config",
        ),
        (
            ["hydra/launcher=packed"],
            "hydra/launcher=packed trains fashion_sweep.train's model in packs: it runs "
            "no other app's trials",
        ),
        pytest.param(
            ["hydra/sweeper/sampler=cmaes"],
            "hydra.sweeper.sampler: CmaEsSampler needs the package cmaes, which is not "
            "installed here (pip install cmaes)",
            marks=pytest.mark.skipif(bool(find_spec("cmaes")), reason="cmaes is installed"),
        ),
        (
            ["hydra.sweeper.app=collections.OrderedDict"],
            "hydra.sweeper.app=collections.OrderedDict is no fashion_sweep.sweeps.apps.App",
        ),
    ],
)
def test_what_another_app_cannot_ask_for_is_refused_in_one_line(
    hydra_sweep_runner, tmp_path, monkeypatch, overrides, said
):
    # in this process (a refusal is a SweepError, which Hydra says in one line: as
    # test_a_task_that_returns_no_number_fails_its_trial_saying_so shows of another)
    monkeypatch.chdir(tmp_path)
    run = hydra_sweep_runner(str(APP), None, None, "conf", "config", overrides, tmp_path)
    with pytest.raises(SweepError) as refused, run:
        pass
    assert str(refused.value) == said
    assert not list(tmp_path.glob("*/"))  # no trial ran
