"""What the sweep relies on beyond the public APIs of Hydra, hydra-optuna-sweeper and
Optuna (README, "Beyond the public APIs"): if an upgrade changes one, this fails."""

from __future__ import annotations

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from fashion_sweep import schedule
from fashion_sweep.study import quiet


def parse(line: str):
    (override,) = OverridesParser.create().parse_overrides([line])
    return create_optuna_distribution_from_override(override)


def test_the_plugins_parser_turns_the_sweep_grammar_into_distributions():
    assert parse("optimizer.lr=tag(log, interval(1e-4, 1))") == FloatDistribution(1e-4, 1, log=True)
    assert parse("data.batch_size=choice(32, 64)") == CategoricalDistribution([32, 64])
    assert parse("model.depth=range(1, 4)") == IntDistribution(1, 3)
    assert parse("data.batch_size=64") == "64"  # a fixed value, as typed


def test_the_storage_methods_behind_heartbeats_and_trial_ids(tmp_path):
    storage = quiet(
        optuna.storages.RDBStorage, f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=1
    )
    study = optuna.create_study(study_name="s", storage=storage)
    trial = quiet(study.ask)
    study_id = storage.get_study_id_from_name("s")
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    storage.record_heartbeat(trial_id)
    assert optuna.trial.Trial(study, trial_id).number == trial.number


def test_an_enqueued_trial_keeps_its_values_in_fixed_params():
    study = optuna.create_study()
    study.enqueue_trial({"optimizer.lr": 0.1}, user_attrs={"retry_of": 3})
    (waiting,) = study.trials
    assert waiting.params == {} and schedule.config(waiting) == (("optimizer.lr", 0.1),)


def test_a_partial_sampler_from_hydra_names_its_class():
    made = instantiate(
        {"_target_": "optuna.samplers.GridSampler", "seed": 0},
        _partial_=True,
        _execution_whitelist_="optuna.samplers.*",
    )
    assert made.func is optuna.samplers.GridSampler
    assert isinstance(made({"x": [1, 2]}, seed=3), optuna.samplers.GridSampler)


def test_a_sweeps_pre_check_leaves_to_the_trials_what_the_space_may_change():
    """fashion_sweep.sweep._related: an error about a key the space searches, inside or
    holding one, may depend on the trial's values; any other refuses the sweep."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from fashion_sweep.sweep import _related

    space = {
        "optimizer.momentum": FloatDistribution(0, 0.9),
        "+optimizer.dampening": CategoricalDistribution([0.0, 0.5]),
        "model": CategoricalDistribution(["mlp"]),
    }
    for keys in [("optimizer.momentum",), ("optimizer.dampening",), ("optimizer",)]:
        assert _related(keys, space), keys
    assert _related(("model.width",), space)  # inside a searched group
    assert not _related(("optimizer.lr",), space)
    assert not _related(("trainer.seed", "data.split_seed"), space)
