"""A single run's start-up: its process imports only what it trains with (no Optuna, no
MLflow), MLflow's work runs in a process beside it (tracking/side_process.py), and
neither one's end leaves the MLflow run RUNNING. The time this saves: `python -m
fashion_sweep.bench --fixed-cost`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATA, wait_for
from tests.test_run_integrity import QUICK, all_runs, start

pytestmark = pytest.mark.slow
# What a single run's own process has no use for: the agent imports MLflow (and with it
# SQLAlchemy, pandas, FastAPI), the resident loader reads the idx files itself.
NOT_IMPORTED = ["mlflow", "sqlalchemy", "pandas", "torchvision", "optuna", "matplotlib"]


def test_a_single_run_imports_neither_mlflow_nor_torchvision_and_logs_in_full(tmp_path):
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fashion_sweep.train", f"data.root={DATA}"]
        + QUICK,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # -X importtime is the run's own: the agent is started without it
    imported = set(re.findall(r"^import time:.*\|\s+([\w.]+)$", done.stderr, re.M))
    assert "torch" in imported and "fashion_sweep.core.engine" in imported
    assert not {m for m in imported if m.split(".")[0] in NOT_IMPORTED}
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert {"train/loss", "test/accuracy"} <= set(run.data.metrics)
    assert run.data.params["optimizer.lr"] == "0.001"
    assert f"MLflow run {run.info.run_id}" in done.stdout


def _pid_of(run) -> str:
    return run.data.tags["process"].rsplit(":", 1)[1]


def test_another_hydra_app_finds_our_plugins_without_importing_torch_or_mlflow(tmp_path):
    # Hydra imports every installed plugin as any app starts: ours must cost it nothing
    # like torch's second (docs/any-app.md); the sphere example's single run, then its sweep
    sphere = Path(__file__).parent / "upstream_optuna" / "example" / "sphere.py"
    probe = (
        "import runpy, sys\n"
        "sys.argv = [sys.argv[1], *sys.argv[2:]]\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "finally:\n"
        "    print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))\n"
    )
    single = [sys.executable, "-c", probe, str(sphere), f"hydra.run.dir={tmp_path / 'one'}"]
    done = subprocess.run(single, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    swept = [*single[:4], "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.sweeper.n_trials=1"]
    done = subprocess.run(swept, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch" not in done.stdout.strip().splitlines()[-1]


def test_a_run_killed_outright_is_ended_failed_crashed_by_its_mlflow_process(tmp_path):
    run, log = start(tmp_path, "data.train_size=2000", "trainer.epochs=300")
    wait_for(lambda: "Epoch 2\n" in log.read_text(), "the second epoch")
    run.kill()  # kill -9: nothing of the run's own clean-up runs
    run.wait(timeout=60)
    wait_for(lambda: all_runs(tmp_path)[0].info.status != "RUNNING", "the run ended", 60)
    (found,) = all_runs(tmp_path)
    assert found.info.status == "FAILED"
    assert found.data.tags["failure_reason"].startswith("crashed")
    assert found.data.metrics["train/loss"] > 0  # what it logged is kept
    assert _pid_of(found) == str(run.pid)


def agent_of(run: subprocess.Popen) -> int:
    children = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True)
    (child,) = children.stdout.split()  # the agent, and nothing else
    return int(child)


def test_a_run_whose_mlflow_process_dies_stops_with_one_line_and_is_ended(tmp_path):
    run, log = start(tmp_path, "data.train_size=2000", "trainer.epochs=300")
    wait_for(lambda: "Epoch 2\n" in log.read_text(), "the second epoch")
    agent = agent_of(run)
    maps = Path(f"/proc/{agent}/maps").read_text()
    assert "libtorch" not in maps and "_sqlite3" in maps  # MLflow's half only
    os.kill(agent, signal.SIGKILL)
    assert run.wait(timeout=120) == 1
    last = log.read_text().strip().splitlines()[-1]
    why = r"the MLflow process ended \(exit status -9\); see above"
    assert re.fullmatch(f"error: {why}", last)
    (found,) = all_runs(tmp_path)  # ended by the run itself, in its own process
    assert found.info.status == "FAILED"
    assert re.fullmatch(f"AgentError: {why}", found.data.tags["failure_reason"])


def test_sigterm_to_the_run_and_its_mlflow_process_together_ends_it_killed(tmp_path):
    """As `pkill -f fashion_sweep`, systemd's stop of a unit or SLURM's preemption do."""
    run, log = start(tmp_path, "data.train_size=2000", "trainer.epochs=300")
    wait_for(lambda: "Epoch 2\n" in log.read_text(), "the second epoch")
    agent = agent_of(run)
    os.kill(agent, signal.SIGTERM)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == -signal.SIGTERM
    (found,) = all_runs(tmp_path)
    assert found.info.status == "KILLED"
    assert found.data.tags["failure_reason"] == "interrupted: SIGTERM"
    wait_for(lambda: not Path(f"/proc/{agent}").exists(), "the agent gone", 30)


def test_the_bench_splits_a_runs_wall_time_into_training_evaluation_and_fixed_cost(
    tmp_path, capsys
):
    """`bench --fixed-cost`: the run's command timed from outside, its training and
    evaluation read from the MLflow run of that very command (not the one that made the
    store), and the rest called its fixed cost."""
    from mlflow.tracking import MlflowClient

    from fashion_sweep.bench import show_fixed_cost
    from fashion_sweep.benchmarks.commands import TINY_RUN, fixed_cost

    run = [*TINY_RUN, "trainer.epochs=2"]  # two epochs: the bench must add them up
    cost = fixed_cost(str(DATA), 1, run, folder=str(tmp_path))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fashion_sweep")
    made_store, timed = client.search_runs([experiment.experiment_id], order_by=["start_time"])
    history = client.get_metric_history(timed.info.run_id, "perf/epoch_seconds")
    assert [m.step for m in history] == [1, 2]
    assert cost["train_seconds"] == pytest.approx(sum(m.value for m in history))
    evaluated = client.get_metric_history(timed.info.run_id, "perf/eval_seconds")
    assert cost["eval_seconds"] == pytest.approx(sum(m.value for m in evaluated))
    # the command outlives its MLflow run, which outlives its epochs
    lived = (timed.info.end_time - timed.info.start_time) / 1000
    assert cost["train_seconds"] + cost["eval_seconds"] < lived < cost["wall_seconds"]
    assert 0 < cost["import_seconds"] < cost["wall_seconds"]
    show_fixed_cost(cost)
    assert "s fixed cost" in capsys.readouterr().out


def test_the_bench_says_where_a_sweeps_time_goes(tmp_path):
    """`bench --sweep`: each launcher's sweep timed from outside; its training and
    evaluation read from its trials' runs (a pack's members each log their share of its
    epochs); its timeline in its parent run."""
    from mlflow.tracking import MlflowClient

    from fashion_sweep.benchmarks.sweep_time import sweeps

    sweep = ["data.train_size=256", "data.val_size=256", "data.test_size=64", "data.batch_size=64"]
    sweep += ["trainer.epochs=1", "hydra.sweeper.n_jobs=3", "hydra.sweeper.n_trials=3"]
    report = sweeps(str(DATA), sweep, ["basic", "packed"], 1, folder=str(tmp_path))
    for name in ("basic", "packed"):
        (row,) = report["runs"][name]
        client = MlflowClient(f"sqlite:///{tmp_path / f'{name}-0' / 'mlflow.db'}")
        found = client.search_runs([client.get_experiment_by_name("fashion_sweep").experiment_id])
        trials = [r for r in found if r.data.tags["fashion_sweep.kind"] == "train"]
        (parent,) = [r for r in found if r.data.tags["fashion_sweep.kind"] == "sweep"]
        spent = [  # each trial's training and evaluation, as its run logged them
            r.data.metrics["perf/epoch_seconds"] + r.data.metrics["perf/eval_seconds"]
            for r in trials
        ]
        assert len(trials) == row["trials"] == 3
        if name == "packed":  # one pack of three, its epoch's seconds in three shares
            assert {r.data.tags["pack"] for r in trials} == {"3 trials: 0, 1, 2"}
            assert spent == pytest.approx([spent[0]] * 3)
        assert row["train_eval_seconds"] == pytest.approx(sum(spent))
        assert 0 < row["train_eval_seconds"] < row["wall_seconds"]
        assert row["busy_fraction"] + row["harness_share"] == pytest.approx(1)
        first = min(r.info.start_time for r in trials)
        held = sum(r.info.end_time - r.info.start_time for r in trials)
        window = max(r.info.end_time for r in trials) - first
        if name == "basic":  # one trial after another: held over the window
            assert row["slots_filled"] == pytest.approx(held / window)
        assert 0 < row["slots_filled"] <= 1
        assert row["trials_per_minute"] == pytest.approx(3 * 60 / row["wall_seconds"])
        assert "plots/timeline.png" in {
            a.path for a in client.list_artifacts(parent.info.run_id, "plots")
        }
    assert report["medians"]["basic"]["wall_seconds"] == report["runs"]["basic"][0]["wall_seconds"]
