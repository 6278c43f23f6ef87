"""A sweep composes its config once; each trial's config is still exactly Hydra's."""

from __future__ import annotations

import pickle

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import OmegaConf

from fashion_sweep.config import plain, register_configs
from fashion_sweep.sweeps.compose import ComposeOnce
from tests.conftest import CONF

COMMAND = ["sweep=optuna", "trainer.epochs=1", "data.train_size=1000"]


def trial(lr: str, batch: int, number: int, *more: str) -> list[str]:
    """What the sweeper hands the launcher for one trial."""
    return [
        f"optimizer.lr={lr}",
        f"data.batch_size={batch}",
        *COMMAND,
        *more,
        "tracking.parent_run_id='0123abcd'",
        f"tracking.trial={number}",
        f"tracking.run_name='sweep-x trial {number}'",
    ]


@pytest.fixture
def loader():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF)):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("train", COMMAND, run_mode=RunMode.MULTIRUN)
        yield loader, master


def as_yaml(config) -> str:
    return OmegaConf.to_yaml(config)  # unresolved: the hydra node, interpolations and all


def test_each_trial_config_equals_hydras_own_composition(loader):
    hydra_loader, master = loader
    once = ComposeOnce(hydra_loader)
    trials = [
        trial("0.05", 32, 0),
        trial("0.5", 128, 1),
        trial("0.001", 64, 2, "optimizer=adam"),  # a config group: composed again
        trial("1e-4", 256, 3, "++trainer.seed=3"),  # not a plain value either
        trial("0.2", 64, 4),
    ]
    for overrides in trials:
        ours = once.load_sweep_config(master, overrides)
        assert as_yaml(ours) == as_yaml(hydra_loader.load_sweep_config(master, overrides))
    assert ours.optimizer.lr == 0.2 and ours.data.batch_size == 64
    assert ours.tracking.trial == 4 and ours.optimizer._target_ == "torch.optim.SGD"
    assert list(ours.hydra.overrides.task) == trials[-1]


class Counting:
    """The real loader, counting the compositions asked of it."""

    def __init__(self, real) -> None:
        self.real, self.composed = real, []

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def load_sweep_config(self, master_config, overrides):
        self.composed.append(list(overrides))
        return self.real.load_sweep_config(master_config, overrides)


def test_composes_once_per_set_of_group_choices(loader):
    hydra_loader, master = loader
    counting = Counting(hydra_loader)
    once = ComposeOnce(counting)
    for number, lr in enumerate(("0.1", "0.2", "0.3")):
        once.load_sweep_config(master, trial(lr, 64, number))
    once.load_sweep_config(master, trial("0.1", 64, 3, "optimizer=adam"))
    adam = once.load_sweep_config(master, trial("0.2", 32, 4, "optimizer=adam"))
    assert counting.composed == [["sweep=optuna"], ["sweep=optuna", "optimizer=adam"]]
    once.load_sweep_config(master, trial("0.3", 32, 5, "++trainer.seed=3"))  # Hydra's, in full
    assert len(counting.composed) == 3
    assert adam.optimizer._target_ == "torch.optim.Adam" and adam.optimizer.lr == 0.2


@pytest.mark.parametrize(
    "bad",
    ["optimizer.lrr=0.1", "data.batch_size=many", "trainer=nonesuch"],
)
def test_bad_trial_values_fail_as_hydra_fails(loader, bad):
    hydra_loader, master = loader
    overrides = [*trial("0.1", 64, 0), bad]
    with pytest.raises(ConfigCompositionException) as hydras:
        hydra_loader.load_sweep_config(master, overrides)
    with pytest.raises(ConfigCompositionException) as ours:
        ComposeOnce(hydra_loader).load_sweep_config(master, overrides)
    assert str(ours.value) == str(hydras.value)


def test_survives_pickling_to_a_worker_process(loader):
    hydra_loader, master = loader
    once = pickle.loads(pickle.dumps(ComposeOnce(hydra_loader)))  # as joblib and submitit do
    overrides = trial("0.3", 32, 0)
    ours = once.load_sweep_config(master, overrides)
    assert as_yaml(ours) == as_yaml(hydra_loader.load_sweep_config(master, overrides))


@pytest.mark.parametrize(
    "line, typed",
    [
        (r"tracking.uri=sqlite\:////tmp/x.db", "tracking.uri=sqlite:////tmp/x.db"),
        (r"tracking.uri=http://me\:***@host\:5000", "tracking.uri=http://me:***@host:5000"),
        ("optimizer.lr=0.1", "optimizer.lr=0.1"),
        (r"tracking.run_name=a\,b", r"tracking.run_name=a\,b"),  # unescaped: a sweep
    ],
)
def test_overrides_are_recorded_as_a_user_types_them(line, typed):
    assert plain(line) == typed
