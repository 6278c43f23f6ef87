"""Scaling out on one machine: a PostgreSQL study shared by sweep workers, an MLflow
tracking server on PostgreSQL, and redaction. (submitit's local executor: test_pruning.py.)

Needs the tests' PostgreSQL (`make test` starts it with .ci/postgres and sets
FASHION_SWEEP_PG and the PG* variables); each test makes its own databases.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from fashion_sweep import schedule
from tests.conftest import DATA, TINY, mlflow_server, run_cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("FASHION_SWEEP_PG"), reason="needs the tests' PostgreSQL (make test)"
    ),
]


def new_database() -> str:
    """A fresh database in the tests' PostgreSQL; its name."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dbname="postgres", autocommit=True) as db:
        db.execute(f"create database {name}")
    return name


def url(database: str, password: str = "") -> str:
    auth = f"{os.environ['PGUSER']}{':' + password if password else ''}"
    return f"postgresql+psycopg://{auth}@{os.environ['PGHOST']}:{os.environ['PGPORT']}/{database}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One MLflow server for the module (it takes 15 s to start); tests tell their runs
    apart by parent run or by experiment."""
    cwd = tmp_path_factory.mktemp("server")
    with mlflow_server(url(new_database()), cwd, workers=2) as address:
        yield address


def worker(cwd: Path, *args: str, host: str | None = None) -> subprocess.Popen:
    """A sweep process; with `host`, as a worker on another machine: a hostname and a
    PID namespace of its own, so its pid tells this machine nothing."""
    cwd.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "fashion_sweep.train", "-m", f"data.root={DATA}", *args]
    if host:
        elsewhere = ["unshare", "--uts", "--pid", "--fork", "--kill-child", "--mount-proc"]
        command = [*elsewhere, "sh", "-c", f'hostname {host} && exec "$@"', "-", *command]
    return subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def kill_mid_trial(proc: subprocess.Popen, study: str, database: str, settle: float) -> None:
    """SIGKILLs `proc` `settle` s into one of its trials, once that trial is seen still
    RUNNING after the wait (a trial that ended in the meantime is passed over)."""
    pids = {proc.pid, 1, 2}  # in a PID namespace of its own, the sweep is 1 or 2 there

    def running() -> set[int]:
        try:
            trials = optuna.load_study(study_name=study, storage=url(database)).trials
        except KeyError:  # not created yet
            return set()
        return {
            t.number
            for t in trials
            if t.state == TrialState.RUNNING and t.user_attrs.get("worker", {}).get("pid") in pids
        }

    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            time.sleep(0.5)
            seen = running()
            if seen:
                time.sleep(settle)
                if seen & running():
                    proc.kill()
                    return
        pytest.fail(f"worker {proc.pid} never stayed {settle} s in a trial")
    finally:
        proc.kill()
        proc.communicate()


def shared_args(database: str, server: str, study: str, n_trials: int) -> list[str]:
    return [
        *TINY,
        "storage=postgres",
        f"hydra.sweeper.storage={url(database)}",
        "tracking=server",
        f"tracking.uri={server}",
        f"hydra.sweeper.study_name={study}",
        f"hydra.sweeper.n_trials={n_trials}",
    ]


def children(server: str, parent: str):
    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("fashion_sweep")
    return client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000
    )


def test_two_workers_share_one_study_and_one_server(tmp_path, server):
    database = new_database()
    args = shared_args(database, server, "shared", 6)
    procs = [worker(tmp_path / name, *args) for name in ("a", "b")]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    failed = "".join(out for p, out in zip(procs, outputs, strict=True) if p.returncode)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(
        line for line in failed.splitlines() if "Error" in line or "error" in line
    )[-3000:]

    study = optuna.load_study(study_name="shared", storage=url(database))
    counted = [t for t in study.trials if schedule.counts(t)]
    assert len(counted) == 6 and all(t.state == TrialState.COMPLETE for t in counted)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    workers = {t.user_attrs["worker"]["id"] for t in counted}
    assert len(workers) == 2, workers  # both processes ran trials
    results = [
        OmegaConf.load(next((tmp_path / name).glob("multirun/*/*/optimization_results.yaml")))
        for name in ("a", "b")
    ]
    assert results[0].parent_run_id == results[1].parent_run_id
    assert results[0].best_trial == results[1].best_trial == study.best_trial.number
    assert results[0].best_run_id == results[1].best_run_id
    runs = children(server, results[0].parent_run_id)
    assert sorted(int(r.data.tags["trial"]) for r in runs) == sorted(t.number for t in counted)
    assert all(r.info.status == "FINISHED" for r in runs)
    parent = MlflowClient(server).get_run(results[0].parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_run_id"] == results[0].best_run_id


def test_killed_worker_leaves_a_failed_trial_and_the_other_finishes(tmp_path, server):
    database = new_database()
    # trials of 4 epochs on 10,000 images (about 2 s each here when the machine is not
    # busy), so the kill lands well inside one, not as it ends (its run ended, its
    # outcome not yet recorded: the sweep would record it from MLflow, not as crashed)
    args = shared_args(database, server, "killed", 6) + ["data.train_size=10000"]
    args += ["trainer.epochs=4"]
    survivor, victim = worker(tmp_path / "a", *args), worker(tmp_path / "b", *args)
    kill_mid_trial(victim, "killed", database, settle=0.3)
    output = survivor.communicate(timeout=600)[0]
    assert survivor.returncode == 0, output[-3000:]

    trials = optuna.load_study(study_name="killed", storage=url(database)).trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    counted = [t for t in trials if schedule.counts(t)]
    assert len(counted) == 6 and all(t.state == TrialState.COMPLETE for t in counted)
    crashed = [t for t in trials if t.user_attrs.get("interrupted") == "crashed"]
    seen = [(t.number, t.state.name, t.user_attrs.get("interrupted")) for t in trials]
    assert crashed and all(t.state == TrialState.FAIL for t in crashed), seen
    assert all(t.user_attrs["worker"]["pid"] == victim.pid for t in crashed)
    (result,) = (tmp_path / "a").glob("multirun/*/*/optimization_results.yaml")
    runs = children(server, OmegaConf.load(result).parent_run_id)
    statuses = {int(r.data.tags["trial"]): r.info.status for r in runs}
    assert "RUNNING" not in statuses.values()
    assert {statuses[t.number] for t in crashed if t.number in statuses} <= {"KILLED"}


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare --uts needs root")
def test_worker_lost_on_another_host_is_failed_by_heartbeat(tmp_path, server):
    """A worker "elsewhere" (its own hostname) that dies mid-trial: no process to look
    at, so its trial is failed once its heartbeat is older than the grace period."""
    database = new_database()
    # trials of 5 epochs on 10,000 images (about 2.5 s each here when the machine is not
    # busy), so the kill lands well inside one (see the test above)
    args = shared_args(database, server, "remote", 4) + ["data.train_size=10000"]
    args += ["trainer.epochs=5"]
    args += ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=4"]
    remote = worker(tmp_path / "b", *args, host="elsewhere")
    kill_mid_trial(remote, "remote", database, settle=0.3)  # its first heartbeat: at ask
    local = worker(tmp_path / "a", *args)
    output = local.communicate(timeout=600)[0]
    assert local.returncode == 0, output[-3000:]
    trials = optuna.load_study(study_name="remote", storage=url(database)).trials
    crashed = [t for t in trials if schedule.cut_off(t)]
    seen = [(t.number, t.state.name, t.user_attrs.get("worker", {}).get("id")) for t in trials]
    assert len(crashed) == 1, seen
    assert crashed[0].user_attrs["worker"]["id"].startswith("elsewhere:"), seen
    assert [t.user_attrs.get("retry_of") for t in trials].count(crashed[0].number) == 1
    counted = [t for t in trials if schedule.counts(t)]
    assert len(counted) == 4 and all(t.state == TrialState.COMPLETE for t in counted)
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_passwords_and_tokens_never_reach_mlflow_or_the_log(tmp_path, server):
    password = os.environ["PGPASSWORD"]
    token = "tok-" + uuid.uuid4().hex
    database = new_database()
    host = server.removeprefix("http://")
    done = run_cli(
        tmp_path,
        "train",
        "-m",
        *TINY,
        "storage=postgres",
        f"hydra.sweeper.storage={url(database, password)}",
        f"tracking.uri=http://user:{token}@{host}",
        "tracking.experiment=secret",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.study_name=secret",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert password not in done.stdout + done.stderr
    assert token not in done.stdout + done.stderr
    written = [p for p in tmp_path.glob("multirun/**/*") if p.is_file()]
    assert [p.name for p in written if p.parent.name == ".hydra"]  # Hydra's record is there
    assert [p.name for p in written if p.suffix == ".log"]  # and the jobs' logs
    for path in written:  # .hydra/ files, logs, optimization_results.yaml
        assert password not in path.read_text() and token not in path.read_text(), path
    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("secret")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3  # the parent and two trials
    for run in runs:
        seen = " ".join([*run.data.params.values(), *run.data.tags.values()])
        for artifact in ("config.yaml", "overrides.yaml"):
            if run.data.tags.get("trial"):
                seen += Path(
                    client.download_artifacts(run.info.run_id, artifact, tmp_path)
                ).read_text()
        assert password not in seen and token not in seen, run.info.run_id
        if run.data.tags.get("trial"):
            assert "user:***@" in run.data.params["tracking.uri"]
    parent = next(r for r in runs if not r.data.tags.get("trial"))
    assert parent.data.tags["optuna.storage"] == url(database, "***")
