"""A sweep's search space: what a sweep's pre-check leaves to the trials, the direction."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution

from fashion_sweep.sweeps.apps import FashionSweepApp
from fashion_sweep.sweeps.settings import SweepError
from fashion_sweep.sweeps.space import directions, related


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
    ours, anyone = FashionSweepApp(OmegaConf.create()).direction, lambda _: None
    assert directions("maximize", ["val/accuracy"], ours) == ["maximize"]
    # as Hydra gives it
    assert directions(OmegaConf.create(["minimize"]), ["val/loss"], ours) == ["minimize"]
    with pytest.raises(SweepError, match="set it to maximize"):
        directions("minimize", ["val/accuracy"], ours)
    with pytest.raises(SweepError, match=r"2 direction\(s\) for 1 metric\(s\) \(val/loss\)"):
        directions(OmegaConf.create(["minimize", "maximize"]), ["val/loss"], ours)
    pair = ["val/accuracy", "perf/epoch_seconds"]
    assert directions(["maximize", "minimize"], pair, ours) == ["maximize", "minimize"]
    with pytest.raises(SweepError, match=r"direction\[1\]=maximize would maximize perf"):
        directions(["maximize", "maximize"], pair, ours)
    # any other app: as many values as directions, and no names to check them by
    assert directions(["minimize", "maximize"], None, anyone) == ["minimize", "maximize"]
    with pytest.raises(SweepError, match="sideways is neither minimize nor maximize"):
        directions("sideways", None, anyone)
