"""A sweep's search space: what a sweep's pre-check leaves to the trials, the direction."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution

from fashion_sweep.sweeps.settings import SweepError
from fashion_sweep.sweeps.space import direction, related


def test_a_sweeps_pre_check_leaves_to_the_trials_what_the_space_may_change():
    """An error about a key the space searches, inside or holding one, may depend on the
    trial's values; any other refuses the sweep."""
    space = {
        "optimizer.momentum": FloatDistribution(0, 0.9),
        "+optimizer.dampening": CategoricalDistribution([0.0, 0.5]),
        "model": CategoricalDistribution(["mlp"]),
    }
    for keys in [("optimizer.momentum",), ("optimizer.dampening",), ("optimizer",)]:
        assert related(keys, space), keys
    assert related(("model.width",), space)  # inside a searched group
    assert not related(("optimizer.lr",), space)
    assert not related(("trainer.seed", "data.split_seed"), space)


def test_the_direction_is_the_one_the_metric_needs():
    assert direction("maximize", "val/accuracy") == "maximize"
    assert direction(OmegaConf.create(["minimize"]), "val/loss") == "minimize"  # as Hydra gives it
    with pytest.raises(SweepError, match="set hydra.sweeper.direction=maximize"):
        direction("minimize", "val/accuracy")
    with pytest.raises(SweepError, match="one direction, for optimized_metric"):
        direction(OmegaConf.create(["minimize", "maximize"]), "val/loss")
