"""The sweeper plugin's settings: the pruner options and what they refuse."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    "option, key, bad",
    [
        ("median", "n_startup_trials", -1),
        ("successive_halving", "reduction_factor", 1),
        ("hyperband", "min_resource", 0),
    ],
)
def test_each_pruner_option_builds_its_optuna_pruner_and_refuses_bad_values(
    compose, option, key, bad
):
    """hydra/sweeper/pruner=<option>: its keys are the pruner's arguments, checked by
    Optuna itself before any store opens (fashion_sweep/sweeps/settings.py)."""
    from hydra.utils import instantiate

    from fashion_sweep.sweeps.plugin import StudySweeper
    from fashion_sweep.sweeps.settings import SweepError

    hydra = compose("sweep=optuna", f"hydra/sweeper/pruner={option}", hydra=True).hydra
    sweeper = instantiate(
        hydra.sweeper, _recursive_=False, _execution_whitelist_=["fashion_sweep.sweeps.plugin.*"]
    )
    settings = sweeper.settings
    assert isinstance(sweeper, StudySweeper) and settings.prunes
    assert type(settings.make_pruner()).__name__.lower().startswith(option.replace("_", ""))
    settings.pruner[key] = bad
    with pytest.raises(SweepError, match=f"hydra.sweeper.pruner: .*{key}"):
        settings.check()
    none = compose("sweep=optuna", hydra=True).hydra.sweeper
    assert none.pruner._target_ == "optuna.pruners.NopPruner"  # the default: today's sweeps
