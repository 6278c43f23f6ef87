"""Scaling out on one machine: a PostgreSQL study shared by sweep workers (one of them
"on another host", killed), an MLflow tracking server on PostgreSQL read through its REST
API, and redaction. (submitit's local executor: test_pruning.py. A dead worker found by
its pid on the same machine, and by its heartbeat, with SQLite: test_integrity.py.)

Needs the tests' PostgreSQL (`make test` starts it with .ci/postgres and sets
FASHION_SWEEP_PG and the PG* variables); each test makes its own databases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from fashion_sweep.sweeps import schedule
from tests.conftest import DATA, TINY, mlflow_server

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


def test_workers_on_two_hosts_share_one_study_and_server_and_outlive_a_dead_one(tmp_path, server):
    """Three workers of one sweep on PostgreSQL and one MLflow server: one "on another
    host" (a hostname and a PID namespace of its own, so its pid tells this machine
    nothing; without root, for `unshare`, a worker on this machine) killed with -9
    mid-trial, then two on this machine started together. The two finish the study
    between them; the dead worker's trial is failed (once its heartbeat is older than the
    grace period; on this machine, as soon as its pid is seen gone), its run KILLED, its
    configuration run again; both end on the same parent run and best trial, which the
    server serves."""
    database = new_database()
    # trials of 3 epochs on 5,000 images (about a second each here when the machine is
    # not busy), so the kill lands well inside one, not as it ends (its run ended, its
    # outcome not yet recorded: the sweep would record it from MLflow, not as crashed)
    args = shared_args(database, server, "shared", 4) + ["data.train_size=5000"]
    args += ["trainer.epochs=3"]
    args += ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=4"]
    host = "elsewhere" if os.geteuid() == 0 else None
    remote = worker(tmp_path / "c", *args, host=host)
    kill_mid_trial(remote, "shared", database, settle=0.3)  # its first heartbeat: at ask
    procs = [worker(tmp_path / name, *args) for name in ("a", "b")]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    failed = "".join(out for p, out in zip(procs, outputs, strict=True) if p.returncode)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(
        line for line in failed.splitlines() if "Error" in line or "error" in line
    )[-3000:]

    study = optuna.load_study(study_name="shared", storage=url(database))
    trials = study.trials
    seen = [(t.number, t.state.name, t.user_attrs.get("worker", {}).get("id")) for t in trials]
    assert not [t for t in trials if t.state == TrialState.RUNNING], seen
    assert len({t.number for t in trials}) == len(trials)
    counted = [t for t in trials if schedule.counts(t)]
    assert len(counted) == 4 and all(t.state == TrialState.COMPLETE for t in counted), seen
    # cut off after it started (not a surplus trial stepped aside: two workers asking
    # at once near the end may overshoot n_trials)
    ran = [t for t in trials if t.user_attrs.get(schedule.CUT_OFF) not in schedule.NOT_RUN]
    (crashed,) = [t for t in ran if schedule.cut_off(t)]
    assert crashed.user_attrs["worker"]["pid"] in (remote.pid, 1, 2), seen  # 1, 2: unshared
    assert crashed.user_attrs["worker"]["id"].startswith(f"{host}:" if host else ""), seen
    assert crashed.state == TrialState.FAIL and "failure_reason" not in crashed.user_attrs
    assert [t.user_attrs.get("retry_of") for t in trials].count(crashed.number) == 1
    hosts = {t.user_attrs["worker"]["id"] for t in counted}
    assert len(hosts) == 2 and crashed.user_attrs["worker"]["id"] not in hosts, hosts

    results = [
        OmegaConf.load(next((tmp_path / name).glob("multirun/*/*/optimization_results.yaml")))
        for name in ("a", "b")
    ]
    assert results[0].parent_run_id == results[1].parent_run_id
    assert results[0].best_trial == results[1].best_trial == study.best_trial.number
    assert results[0].best_run_id == results[1].best_run_id
    served(f"{server}/api/2.0/mlflow", results[0], counted, crashed)


def served(base: str, found: dict, counted: list, crashed: optuna.trial.FrozenTrial) -> None:
    """What the real `mlflow server` serves of the sweep, read through its REST API."""

    def call(path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            base + path, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    experiment = call("/experiments/get-by-name?experiment_name=fashion_sweep")
    experiment_id = experiment["experiment"]["experiment_id"]
    parent_id = found["parent_run_id"]
    children = call(
        "/runs/search",
        {
            "experiment_ids": [experiment_id],
            "filter": f"tags.`mlflow.parentRunId` = '{parent_id}'",
            "max_results": 1000,
        },
    )["runs"]
    status = {}
    for child in children:
        tags = {t["key"]: t["value"] for t in child["data"]["tags"]}
        status[int(tags["trial"])] = child["info"]["status"]
    assert {t.number: "FINISHED" for t in counted}.items() <= status.items()
    assert status.get(crashed.number, "KILLED") == "KILLED"  # if it got so far as a run
    child = next(c for c in children if c["info"]["status"] == "FINISHED")
    params = {p["key"]: p["value"] for p in child["data"]["params"]}
    assert {"optimizer.lr", "data.batch_size", "model.width"} <= set(params)
    history = call(
        f"/metrics/get-history?run_id={child['info']['run_id']}&metric_key=val/accuracy"
    )["metrics"]
    assert [m["step"] for m in history] == [1, 2, 3]
    parent = call(f"/runs/get?run_id={parent_id}")["run"]
    tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    assert parent["info"]["status"] == "FINISHED"
    assert tags["best_run_id"] == found["best_run_id"]


def test_passwords_and_tokens_never_reach_mlflow_or_the_log(main, tmp_path, server):
    password = os.environ["PGPASSWORD"]
    token = "tok-" + uuid.uuid4().hex
    database = new_database()
    host = server.removeprefix("http://")
    done = main(
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
