"""Real `python -m fashion_sweep.train -m sweep=optuna` sweeps on a small real subset, run
in this process (tests/conftest.py's `main`), the joblib launcher's trials in its worker
processes. (The real `mlflow server` serving a sweep: test_scale.py.)"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from tests.conftest import TINY, copy_store, run_main

pytestmark = pytest.mark.slow


def results(cwd: Path) -> dict:
    (path,) = cwd.glob("multirun/*/*/optimization_results.yaml")
    return OmegaConf.to_container(OmegaConf.load(path))


def runs(cwd: Path):
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fashion_sweep")
    found = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in found if r.data.tags["fashion_sweep.kind"] == "sweep"]
    children = [r for r in found if r.data.tags["fashion_sweep.kind"] == "train"]
    return client, parents, children


def study(cwd: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd / 'optuna.db'}")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, data_root, mlflow_template):
    """One real 3-trial sweep, shared by the tests that only read what it left."""
    cwd = tmp_path_factory.mktemp("sweep")
    copy_store(mlflow_template, cwd)
    args = ["hydra.sweeper.n_trials=3", "hydra.sweeper.study_name=demo"]
    assert run_main("train", "-m", *TINY, *args, cwd=cwd) == 0
    return cwd


def test_sweep_writes_results_and_keeps_every_trial_in_the_study(swept):
    found = results(swept)
    assert found["study_name"] == "demo" and found["optimized_metric"] == "val/accuracy"
    assert (found["finished"], found["complete"], found["failed"]) == (3, 3, 0)
    assert set(found["best_params"]) == {"optimizer.lr", "data.batch_size"}
    trials = study(swept, "demo").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert max(t.value for t in trials) == found["best_value"]
    for t in trials:
        assert 1e-4 <= t.params["optimizer.lr"] <= 0.1  # TINY's space
        assert t.params["data.batch_size"] in (32, 64, 128, 256)
    for db in ("optuna.db", "mlflow.db"):  # commits without a disk sync each
        with sqlite3.connect(swept / db) as connection:
            assert connection.execute("pragma journal_mode").fetchone() == ("wal",)
    trial_dirs = sorted(p.name for p in swept.glob("multirun/*/*/*") if p.is_dir())
    assert trial_dirs == ["0", "1", "2"]
    for t in trials:  # each job's record holds its own trial's values
        (job,) = swept.glob(f"multirun/*/*/{t.number}/.hydra")
        config = OmegaConf.load(job / "config.yaml")
        assert config.optimizer.lr == t.params["optimizer.lr"]
        assert config.data.batch_size == t.params["data.batch_size"]
        assert config.tracking.trial == t.number and config.data.train_size == 1000
        overrides = OmegaConf.load(job / "overrides.yaml")
        assert f"tracking.trial={t.number}" in overrides and "sweep=optuna" in overrides


def test_sweep_lands_in_mlflow_as_parent_and_children(swept):
    client, (parent,), children = runs(swept)
    found = results(swept)
    assert parent.info.status == "FINISHED" and "demo" in parent.info.run_name
    assert parent.info.run_id == found["parent_run_id"]
    assert sorted(int(c.data.tags["trial"]) for c in children) == [0, 1, 2]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"val/accuracy", "test/accuracy"} <= set(child.data.metrics)
        assert child.data.params["data.val_size"] == "500"
        assert "model.pth" in {a.path for a in client.list_artifacts(child.info.run_id)}
    # honest selection: the best trial is the best on validation, whatever the test says
    by_trial = {c.data.tags["trial"]: c.info.run_id for c in children}
    linked = {str(t.number): t.user_attrs["mlflow_run_id"] for t in study(swept, "demo").trials}
    assert linked == by_trial  # each Optuna trial names its own MLflow run
    best = max(children, key=lambda c: c.data.metrics["val/accuracy"])
    assert parent.data.tags["best_run_id"] == best.info.run_id == found["best_run_id"]
    assert parent.data.metrics["val/accuracy"] == best.data.metrics["val/accuracy"]
    assert parent.data.tags["best.optimizer.lr"] == best.data.params["optimizer.lr"]
    assert parent.data.tags["best.data.batch_size"] == best.data.params["data.batch_size"]
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {
        "plots/optimization_history.png",
        "plots/param_importances.png",
        "plots/lr_x_batch_size.png",
    }


def test_predict_best_uses_the_best_trials_model(swept, main):
    best = results(swept)["best_run_id"]
    store = f"tracking.uri=sqlite:///{swept / 'mlflow.db'}"
    for run_id in ("best", results(swept)["parent_run_id"]):
        shown = main("predict", f"run_id={run_id}", store, cwd=swept)
        assert shown.returncode == 0, shown.stderr
        assert f"MLflow run {best}" in shown.stdout
        assert re.search(r'^Predicted: ".+", Actual: "Ankle boot"$', shown.stdout, re.M)


def test_diverging_trial_is_failed_and_the_sweep_goes_on(sweep, tmp_path):
    done = sweep(
        "hydra/sweeper/sampler=grid",
        "optimizer.lr=choice(0.05,10000.0)",
        "data.batch_size=64",
        "trainer.log_interval=2",
        "hydra.sweeper.study_name=bad",
        "hydra.sweeper.max_failure_rate=0.5",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trials = {t.params["optimizer.lr"]: t for t in study(tmp_path, "bad").trials}
    assert trials[0.05].state == TrialState.COMPLETE
    assert trials[10000.0].state == TrialState.FAIL
    reason = "DivergedError: train/loss is nan at batch "  # its type named once
    assert trials[10000.0].user_attrs["failure_reason"].startswith(reason)
    _, (parent,), children = runs(tmp_path)
    status = {c.data.params["optimizer.lr"]: c for c in children}
    assert status["10000.0"].info.status == "FAILED"
    assert status["10000.0"].data.tags["failure_reason"].startswith(reason)
    assert status["0.05"].info.status == "FINISHED"
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_run_id"] == status["0.05"].info.run_id


def test_too_many_failures_stop_the_sweep_with_a_clear_error(sweep, tmp_path):
    done = sweep(
        "optimizer.lr=10000.0",
        "trainer.log_interval=2",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.max_failure_rate=0.25",
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "1 trials failed, more than hydra.sweeper.max_failure_rate=0.25 of "
        "hydra.sweeper.n_trials=3 allows"
    )
    _, (parent,), children = runs(tmp_path)
    assert parent.info.status == "FAILED" and len(children) == 1
    assert children[0].info.status == "FAILED"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lrx=interval(0.1,1)", "sweep parameter 'optimizer.lrx' is not a key"),
        ("data.batch_size=choice()", "empty choice is not legal"),
        ("optimizer.lr=interval(1,0.1)", "sweep parameter 'optimizer.lr'"),
        ("hydra.sweeper.direction=minimize", "set hydra.sweeper.direction=maximize"),
        ("hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials must be >= 1, got 0"),
    ],
)
def test_bad_sweep_overrides_fail_before_any_trial(sweep, tmp_path, override, message):
    done = sweep(override)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.glob("multirun/*/*/0"))


def test_joblib_launcher_runs_trials_in_parallel_without_losing_any(sweep, tmp_path):
    done = sweep(
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=4",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.study_name=parallel",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "database is locked" not in done.stderr + done.stdout
    trials = study(tmp_path, "parallel").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    client, (parent,), children = runs(tmp_path)
    assert sorted(int(c.data.tags["trial"]) for c in children) == [0, 1, 2, 3]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert len(client.get_metric_history(child.info.run_id, "val/accuracy")) == 1
        assert "model.pth" in {a.path for a in client.list_artifacts(child.info.run_id)}
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}
    # trials ran in joblib's two worker processes, not in the sweep's
    processes = {c.data.tags["process"] for c in children}
    sweeper = {t.user_attrs["worker"]["id"].rsplit(":", 1)[0] for t in trials}
    assert len(processes) == 2 and not processes & sweeper, (processes, sweeper)
