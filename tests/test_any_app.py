"""Our sweeper for any Hydra app (docs/any-app.md): tests/any_app/app.py knows nothing of
fashion_sweep but `fashion_sweep.sweeps.pruning.report`, and selects hydra/sweeper=study.
Each sweep runs as its user runs it, in a process of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

APP = Path(__file__).parent / "any_app" / "app.py"


def sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(APP), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    return subprocess.run(
        [*command, *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )


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
            ["hydra/launcher=packed"],
            "hydra/launcher=packed trains fashion_sweep.train's model in packs: it runs "
            "no other app's trials",
        ),
        (
            ["hydra.sweeper.app=collections.OrderedDict"],
            "hydra.sweeper.app=collections.OrderedDict is no fashion_sweep.sweeps.apps.App",
        ),
    ],
)
def test_what_another_app_cannot_ask_for_is_refused_in_one_line(tmp_path, overrides, said):
    done = sweep(tmp_path, *overrides)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == said
    assert not list((tmp_path / "sweep").glob("*/"))  # no trial ran
