"""Runs on a bad day, with real stores: signals that end them and first use by many at
once (real processes), stores that cannot be reached, predict on runs without a model,
values that cannot run, and where artifacts land (the commands in this process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from fashion_sweep.run import predict, train
from fashion_sweep.signals import Terminated
from tests.conftest import DATA, TINY, free_port, wait_for

QUICK = ["data.train_size=64", "data.test_size=64", "trainer.epochs=1"]
ENDING = [signal.SIGTERM, signal.SIGHUP]  # Ctrl-C: test_signals.py, test_integrity.py


def start(cwd: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """The train command in its own session, its output in a file."""
    log = cwd / f"out-{time.monotonic_ns()}.txt"
    process = subprocess.Popen(
        [sys.executable, "-m", "fashion_sweep.train", f"data.root={DATA}", *args],
        cwd=cwd,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    return process, log


def all_runs(cwd: Path, name: str = "mlflow.db") -> list:
    client = MlflowClient(f"sqlite:///{cwd / name}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=1000) if experiments else []


@pytest.mark.slow
@pytest.mark.parametrize("signum", ENDING, ids=lambda s: signal.Signals(s).name)
def test_a_signal_ends_a_run_killed_with_its_reason_and_the_conventional_status(
    tmp_path, seed, signum
):
    seed(tmp_path)
    run, log = start(tmp_path, "data.train_size=2000", "trainer.epochs=300")
    wait_for(lambda: "Epoch 2\n" in log.read_text(), "the second epoch")
    run.send_signal(signum)
    assert run.wait(timeout=60) == -signum  # the shell shows 128 + signum
    expected = f"interrupted: {signal.Signals(signum).name}"
    said = log.read_text().strip().splitlines()
    assert said[-1] == f"error: {expected}"
    (found,) = all_runs(tmp_path)
    assert found.info.status == "KILLED", (found.info, found.data.tags, said[-12:])
    assert found.data.tags["failure_reason"] == expected
    assert found.data.metrics["train/loss"] > 0  # what it logged is kept


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_sweep_stopped_by_sigterm_leaves_nothing_running_and_keeps_what_finished(
    tmp_path, seed, launcher
):
    """SIGTERM to the sweep's process alone, as `docker stop` or `kill` send it."""
    args = [*TINY, "data.train_size=10000", "trainer.epochs=2", f"hydra/launcher={launcher}"]
    args += ["hydra.launcher.n_jobs=1"] if launcher == "joblib" else []
    store = f"sqlite:///{seed(tmp_path)}"  # the sweeper escapes it: sqlite\\:///
    sweep, log = start(
        tmp_path, "-m", *args, "hydra.sweeper.study_name=term", f"tracking.uri={store}"
    )
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def second_running() -> bool:
        try:
            trials = optuna.load_study(study_name="term", storage=storage).trials
        except (KeyError, ValueError, RuntimeError):
            return False
        states = [t.state for t in trials]
        return states[:2] == [TrialState.COMPLETE, TrialState.RUNNING] and any(
            r.data.tags.get("trial") == "1" for r in all_runs(tmp_path)
        )

    wait_for(second_running, "trial 0 done and trial 1 running")
    os.kill(sweep.pid, signal.SIGTERM)
    assert sweep.wait(timeout=120) == -signal.SIGTERM, log.read_text()[-3000:]
    trials = optuna.load_study(study_name="term", storage=storage).trials
    assert trials[0].state == TrialState.COMPLETE
    assert trials[1].state == TrialState.FAIL
    assert trials[1].user_attrs["interrupted"] == "interrupted: SIGTERM"
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    runs = {r.data.tags.get("trial", "parent"): r for r in all_runs(tmp_path)}
    assert runs["0"].info.status == "FINISHED"
    assert runs["1"].info.status == "KILLED" and runs["parent"].info.status == "KILLED"
    assert runs["parent"].data.tags["failure_reason"] == "interrupted: SIGTERM"
    assert runs["1"].data.tags["failure_reason"] == "interrupted: SIGTERM"
    assert f"tracking.uri={store}" in runs["0"].data.tags["overrides"]  # as typed


@pytest.mark.slow
def test_runs_started_together_on_a_fresh_data_root_and_store_all_succeed(tmp_path, data_root):
    """...and keep their artifacts beside the store, not in the folder they run in."""
    root, elsewhere = tmp_path / "fresh-data", tmp_path / "store"
    store = f"tracking.uri=sqlite:///{elsewhere}/mlflow.db"
    procs = [start(tmp_path, f"data.root={root}", store, *QUICK)[0] for _ in range(3)]
    codes = [p.wait(timeout=300) for p in procs]
    outputs = [log.read_text() for log in tmp_path.glob("out-*.txt")]
    assert codes == [0, 0, 0], "\n".join(o[-1500:] for o in outputs)
    found = all_runs(elsewhere)
    assert len(found) == 3 and {r.info.status for r in found} == {"FINISHED"}
    assert not list((root / "FashionMNIST" / "raw").glob("*partial*"))
    for run in found:
        assert run.info.artifact_uri.startswith(str(elsewhere / "mlruns" / "fashion_sweep"))
        assert (Path(run.info.artifact_uri) / "model.pth").is_file()
    assert not (tmp_path / "mlruns").exists()


def test_a_store_that_cannot_be_reached_is_one_line_before_the_data(main, tmp_path):
    port = free_port()
    started = time.monotonic()
    done = main("train", *QUICK, f"tracking.uri=http://me:secret@127.0.0.1:{port}")
    took = time.monotonic() - started
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: tracking.uri=http://me:***@127.0.0.1:{port} cannot be reached (Connection "
        "refused): start it (`make server` for a tracking server) or point tracking.uri at "
        "one that runs"
    )
    assert "Using" not in done.stdout  # nothing was loaded
    assert took < 10, took  # MLflow's own retries took 263 s
    garbage = main("train", *QUICK, "tracking.uri=garbage")
    assert garbage.returncode == 2
    (line,) = garbage.stderr.strip().splitlines()
    assert line.startswith("error: tracking.uri=garbage is not a store address")


@pytest.mark.slow
@pytest.mark.parametrize(
    "store, why",
    [
        ("sqlite:////proc/nope.db", "its folder /proc cannot hold it"),
        ("sqlite:///mlflow.db", "is MLflow's store, not an Optuna study's database"),
    ],
    ids=["unwritable", "MLflow's"],
)
def test_a_sweep_whose_study_cannot_be_opened_is_refused_before_either_store_is_written(
    main, seed, tmp_path, store, why
):
    """The study's database is checked with MLflow's store, before either is set up: a
    sweep that cannot start makes no runs.db, and adds nothing to the mlflow.db there
    (SQLite's -shm and -wal files beside it aside: a reader's)."""
    seed(tmp_path)  # ./mlflow.db: MLflow's store, set up

    def files():
        return {p.name: p.read_bytes() for p in tmp_path.glob("*.db")}

    before = files()
    args = [f"hydra.sweeper.storage={store}", "tracking.uri=sqlite:///runs.db"]
    done = main("train", "-m", *TINY, *args)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: hydra.sweeper.storage={store}: ") and why in line
    assert files() == before


def test_the_commands_store_error_comes_back_from_its_mlflow_process_as_one_line(cli, tmp_path):
    """A single run's store is opened by its MLflow process (tracking/side_process.py),
    whose error the run reports as its own."""
    done = cli("train", *QUICK, "tracking.uri=garbage")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: tracking.uri=garbage is not a store address")
    assert "Using" not in done.stdout


def test_predict_wants_a_run_with_a_model_and_never_makes_a_store(main, compose, store, tmp_path):
    with_model = train(compose(*QUICK, f"tracking.uri={store}")).run_id
    unlogged = train(compose(*QUICK, f"tracking.uri={store}", "tracking.log_model=false")).run_id
    cfg = compose(*QUICK, f"tracking.uri={store}", "trainer.epochs=2")

    def sigterm(*_):  # a SIGTERM as the first epoch ends
        raise Terminated(signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        train(cfg, prune=sigterm)
    killed = all_runs(tmp_path)[0].info.run_id  # the newest

    predicted = predict(compose(f"tracking.uri={store}", config="predict"))
    assert predicted[0] == with_model  # latest: the newest run that has a model
    for run_id, why in (
        (killed, "it is KILLED (interrupted: SIGTERM)"),
        (unlogged, "it ran with tracking.log_model=false"),
    ):
        with pytest.raises(LookupError) as caught:
            predict(compose(f"run_id={run_id}", f"tracking.uri={store}", config="predict"))
        assert str(caught.value) == f"run {run_id} has no model.pth: {why}"

    refused = main("predict", f"run_id={killed}", f"tracking.uri={store}")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"error: run {killed} has no model.pth: it is KILLED (interrupted: SIGTERM)"
    )
    typo = tmp_path / "mlfow.db"
    with pytest.raises(LookupError, match=f"there is no MLflow store at {typo}"):
        predict(compose(f"tracking.uri=sqlite:///{typo}", config="predict"))
    assert not typo.exists()


BAD = [
    ("optimizer.lr=inf", "error: optimizer.lr must be a finite number > 0, got inf"),
    ("+optimizer.foo=1", "error: optimizer.foo is not an argument of torch.optim.SGD"),
]


@pytest.mark.parametrize("override, line", BAD, ids=[b[0] for b in BAD])
def test_values_torch_cannot_run_are_one_line_before_any_work(main, tmp_path, override, line):
    done = main("train", *QUICK, override, f"tracking.uri=sqlite:///{tmp_path / 'm.db'}")
    assert done.returncode == 2
    (first,) = done.stderr.strip().splitlines()
    assert first.startswith(line), done.stderr
    assert "Using" not in done.stdout and not (tmp_path / "m.db").exists()


def test_torch_refusing_a_combination_is_one_line_and_no_run(main, tmp_path):
    store = tmp_path / "m.db"
    args = ["+optimizer.dampening=0.5", "optimizer.nesterov=true", "optimizer.momentum=0.9"]
    done = main("train", *QUICK, *args, f"tracking.uri=sqlite:///{store}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: optimizer: Nesterov momentum requires a momentum and zero dampening"
    ]
    assert not store.exists()  # refused before the store is opened


def test_a_plain_multirun_checks_every_job_before_the_first(main, tmp_path):
    done = main(
        "train", "-m", *QUICK, "optimizer.lr=0.1,0", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: job 1 (optimizer.lr=0): optimizer.lr must be a finite number > 0, got 0.0"
    )
    assert "Traceback" not in done.stderr and "Epoch 1" not in done.stdout
    assert not (tmp_path / "m.db").exists()  # the values are checked before the store


@pytest.mark.slow
def test_a_sweep_refuses_a_fixed_value_no_trial_can_run_with_before_any_trial(main, seed, tmp_path):
    done = main("train", "-m", *TINY, "optimizer.nesterov=true")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: optimizer.nesterov=true needs optimizer.momentum > 0, got 0.0"
    )
    assert not (tmp_path / "optuna.db").exists()
    # ...but a value that only some points of the space make bad is each trial's own
    space = ["optimizer.momentum=choice(0.0,0.9)", "optimizer.nesterov=true"]
    seed(tmp_path)
    done = main(
        "train", "-m", *TINY, *space, "hydra.sweeper.n_trials=2", "hydra.sweeper.max_failure_rate=1"
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_bench_refuses_zero_epochs_in_one_line(capsys):
    from fashion_sweep import bench

    with pytest.raises(SystemExit) as stop:
        bench.main(["--epochs", "0"])
    assert stop.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith("argument --epochs: must be >= 1, got 0")
    )


def test_a_sweep_run_whose_records_mlflow_refuses_is_not_left_running(store):
    import mlflow
    from mlflow import MlflowClient

    from fashion_sweep.tracking import sweep_runs

    with pytest.raises(mlflow.exceptions.MlflowException, match="Invalid value"):
        sweep_runs.open_sweep_run(store, "refused", "a sweep", {"space.+lr": "x"}, None)
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("refused").experiment_id])
    assert run.info.status == "FAILED"
    assert "Invalid value" in run.data.tags["failure_reason"]
