"""What the code relies on beyond the public APIs of Hydra, hydra-optuna-sweeper, Optuna
and MLflow (docs/design.md, "Beyond the public APIs"), pinned: if an upgrade changes
one, a test here fails, naming it. (Hydra's run_job handing a task its config:
tests/test_packing.py, against a real run_job.)"""

from __future__ import annotations

import warnings

import optuna
import pytest
import sqlalchemy
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from fashion_sweep.sweeps import schedule, study
from fashion_sweep.sweeps.study import quiet


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def parse(line: str):
    (override,) = OverridesParser.create().parse_overrides([line])
    return create_optuna_distribution_from_override(override)


def test_the_plugins_parser_turns_the_sweep_grammar_into_distributions():
    assert parse("optimizer.lr=tag(log, interval(1e-4, 1))") == FloatDistribution(1e-4, 1, log=True)
    assert parse("data.batch_size=choice(32, 64)") == CategoricalDistribution([32, 64])
    assert parse("model.depth=range(1, 4)") == IntDistribution(1, 3)
    assert parse("data.batch_size=64") == "64"  # a fixed value, as typed


def test_the_basic_sweepers_expansion_of_a_plain_multirun():
    """sweeps/callbacks.CheckJobs checks the jobs Hydra's basic sweeper will run: every
    combination of the comma-separated values in order, a later value of a key in the
    place of the earlier one; an interval is refused."""
    parsed = OverridesParser.create().parse_overrides(["a=1,2", "b=x,y", "c=3", "a=5,6"])
    assert BasicSweeper.split_arguments(parsed, None) == [
        [["a=5", "b=x", "c=3"], ["a=5", "b=y", "c=3"], ["a=6", "b=x", "c=3"], ["a=6", "b=y", "c=3"]]
    ]
    ranged = OverridesParser.create().parse_overrides(["a=range(1,3)"])
    assert BasicSweeper.split_arguments(ranged, None) == [[["a=1"], ["a=2"]]]
    spanned = OverridesParser.create().parse_overrides(["a=interval(0,1)"])
    with pytest.raises(Exception, match="does not support sweep type"):
        BasicSweeper.split_arguments(spanned, None)


def test_the_storage_methods_behind_heartbeats_trial_ids_and_recording(tmp_path):
    """A worker's heartbeats and a job's record go through the storage and a Trial made
    from a trial id, from a process that did not ask for the trial."""
    storage = quiet(
        optuna.storages.RDBStorage, f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=1
    )
    held = optuna.create_study(study_name="s", storage=storage)
    trial = quiet(held.ask)
    study_id = storage.get_study_id_from_name("s")
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    assert storage.get_trial(trial_id).number == trial.number
    storage.record_heartbeat(trial_id)
    quiet(optuna.storages.fail_stale_trials, held)
    assert held.trials[0].state == TrialState.RUNNING  # its heartbeat is fresh
    other = optuna.load_study(
        study_name="s", storage=storage, sampler=optuna.samplers.RandomSampler()
    )
    recording = optuna.trial.Trial(other, trial_id)
    recording.set_user_attr("mlflow_run_id", "r")
    recording.report(0.5, step=1)
    (found,) = held.trials
    assert found.user_attrs["mlflow_run_id"] == "r" and found.intermediate_values == {1: 0.5}


def test_an_enqueued_trial_keeps_its_values_in_fixed_params():
    held = optuna.create_study()
    held.enqueue_trial({"optimizer.lr": 0.1}, user_attrs={"retry_of": 3})
    (waiting,) = held.trials
    assert waiting.params == {} and schedule.config(waiting) == (("optimizer.lr", 0.1),)


def test_a_partial_sampler_from_hydra_names_its_class():
    made = instantiate(
        {"_target_": "optuna.samplers.GridSampler", "seed": 0},
        _partial_=True,
        _execution_whitelist_="optuna.samplers.*",
    )
    assert made.func is optuna.samplers.GridSampler
    assert isinstance(made({"x": [1, 2]}, seed=3), optuna.samplers.GridSampler)


def test_the_messages_the_code_matches_on():
    """study.tell lets the grid sampler's "Study.stop" error pass; study.quiet filters
    the heartbeat warning by its text; study.storage retries a race to create tables
    by what the database says (RACE_SIGNS)."""
    grid = optuna.create_study(sampler=optuna.samplers.GridSampler({"x": [1]}))
    done = grid.ask({"x": CategoricalDistribution([1])})
    with pytest.raises(RuntimeError, match="Study.stop"):
        grid.tell(done, 1.0)
    study.tell(grid, grid.ask({"x": CategoricalDistribution([1])}), values=1.0)
    assert [t.state for t in grid.trials] == [TrialState.COMPLETE] * 2

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        beating = optuna.create_study(storage=heartbeats())
        beating.ask()
    assert any("Heartbeat of storage is supposed to be used" in str(w.message) for w in seen)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        study.quiet(optuna.create_study(storage=heartbeats()).ask)
    assert not seen


def test_a_race_to_create_the_tables_reads_as_study_expects(tmp_path):
    from optuna.storages._rdb import models

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    with pytest.raises(sqlalchemy.exc.DatabaseError) as lost:  # as the loser of the race
        models.BaseModel.metadata.create_all(storage.engine, checkfirst=False)
    assert any(sign in str(lost.value) for sign in study.RACE_SIGNS)


def heartbeats():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.storages.RDBStorage("sqlite://", heartbeat_interval=1)


def test_mlflow_writes_an_artifact_through_the_runs_repository(tmp_path):
    """tracking/runs.py writes artifacts to the repository of the run as created
    (artifact_repository_registry), not through MLflow's log_artifact, which reads the
    run back first."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("x", str(tmp_path / "artifacts")))
    (tmp_path / "model.pth").write_bytes(b"weights")
    get_artifact_repository(run.info.artifact_uri, tracking_uri=uri).log_artifact(
        str(tmp_path / "model.pth")
    )
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["model.pth"]
