"""The configs compose, overrides land where docs/configuration.md says, bad input is
refused."""

from __future__ import annotations

import inspect

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import get_method
from omegaconf import OmegaConf

from fashion_sweep.config import ConfigError, validate
from tests.conftest import CONF

# groups that set Hydra's sweeper or launcher, and a key each sets, as it should start
SWEEP_GROUPS = {"storage": "hydra.sweeper.storage", "launcher": "hydra.launcher._target_"}
EXPECTED = {
    "postgres": "postgresql+psycopg://",
    "slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    "local": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
}
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "sweep")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g in GROUPS for o in options(g)], ids=lambda s: s
)
def test_every_option_of_every_group_composes_and_validates(compose, override):
    group, option = override.split("=")
    if group in SWEEP_GROUPS:  # they configure hydra.sweeper, so need sweep=optuna
        cfg = compose("sweep=optuna", override, hydra=True)
        assert OmegaConf.select(cfg, SWEEP_GROUPS[group]).startswith(EXPECTED[option])
        cfg = compose("sweep=optuna", override)
    else:
        cfg = compose(override)
        assert OmegaConf.select(cfg, group) is not None, option
    validate(cfg)


def test_defaults_are_the_tutorial(compose):
    cfg = compose()
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert cfg.optimizer.lr == 1e-3
    assert (cfg.data.batch_size, cfg.data.shuffle, cfg.data.val_size) == (64, False, 0)
    assert (cfg.model.width, cfg.model.depth) == (512, 2)
    assert cfg.trainer.epochs == 5
    assert cfg.trainer.device == "auto"
    assert cfg.tracking.uri == "sqlite:///mlflow.db"


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("optimizer=adam", "optimizer._target_", "torch.optim.Adam"),
        ("optimizer=adamw", "optimizer.weight_decay", 0.01),
        ("optimizer.lr=0.05", "optimizer.lr", 0.05),
        ("optimizer.momentum=0.9", "optimizer.momentum", 0.9),
        ("model.width=128", "model.width", 128),
        ("model.depth=3", "model.depth", 3),
        ("data.batch_size=256", "data.batch_size", 256),
        ("data.num_workers=2", "data.num_workers", 2),
        ("data.shuffle=true", "data.shuffle", True),
        ("data.root=/elsewhere", "data.root", "/elsewhere"),
        ("data.train_size=1000", "data.train_size", 1000),
        ("data.val_size=5000", "data.val_size", 5000),
        ("data.test_size=100", "data.test_size", 100),
        ("data.loader=resident", "data.loader", "resident"),
        ("trainer.epochs=1", "trainer.epochs", 1),
        ("trainer.device=cpu", "trainer.device", "cpu"),
        ("trainer.seed=7", "trainer.seed", 7),
        ("tracking.uri=sqlite:///x.db", "tracking.uri", "sqlite:///x.db"),
        ("tracking.experiment=mine", "tracking.experiment", "mine"),
    ],
)
def test_override_lands_where_expected(compose, override, key, value):
    assert OmegaConf.select(compose(override), key) == value


def test_optimizer_switch_keeps_its_own_keys(compose):
    adam = compose("optimizer=adam", "optimizer.lr=3e-4")
    assert adam.optimizer.lr == 3e-4 and list(adam.optimizer.betas) == [0.9, 0.999]
    assert "momentum" not in adam.optimizer


@pytest.mark.parametrize("group", ["model", "optimizer"])
def test_target_nodes_bind_to_their_signature(compose, group):
    """A key the target does not take fails here, without building anything."""
    for option in options(group):
        node = OmegaConf.to_container(compose(f"{group}={option}")[group])
        target = get_method(node.pop("_target_"))
        extra = {"params": []} if group == "optimizer" else {}
        inspect.signature(target).bind(**extra, **node)


@pytest.mark.parametrize(
    "override, error, named",
    [
        ("optimizer.lrr=0.1", ConfigCompositionException, "lrr"),
        ("data.batchsize=32", ConfigCompositionException, "batchsize"),
        ("data.batch_size=big", ConfigCompositionException, "data.batch_size"),
        ("trainer.epochs=1.5", ConfigCompositionException, "trainer.epochs"),
        ("trainer.device=tpu", ConfigCompositionException, "trainer.device"),
        ("data.loader=fast", ConfigCompositionException, "data.loader"),
        ("optimizer=rmsprop", ConfigCompositionException, "rmsprop"),
        ("model=resnet", ConfigCompositionException, "resnet"),
    ],
)
def test_composition_rejects_and_names_the_key(compose, override, error, named):
    with pytest.raises(error) as excinfo:
        compose(override)
    cause = excinfo.value.__cause__
    text = f"{excinfo.value} {cause if cause else ''}"
    assert named in text


@pytest.mark.parametrize(
    "override, named",
    [
        ("optimizer.lr=0", "optimizer.lr"),
        ("optimizer.lr=-1e-3", "optimizer.lr"),
        ("optimizer.momentum=-0.5", "optimizer.momentum"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.batch_size=-64", "data.batch_size"),
        ("data.train_size=60001", "data.train_size"),
        ("data.train_size=55001 data.val_size=5000", "data.train_size"),
        ("data.test_size=10001", "data.test_size"),
        ("data.val_size=-1", "data.val_size"),
        ("model.width=0", "model.width"),
        ("trainer.epochs=0", "trainer.epochs"),
        ("optimized_metric=val/accuracy", "data.val_size"),
        ("optimized_metric=accuracy", "optimized_metric"),
        ("optimized_metric=[test/accuracy,speed]", "optimized_metric must be one of"),
        ("optimized_metric=[test/loss,test/loss]", "a list of distinct ones"),
        ("optimizer=adam optimizer.betas=[0.9,1.5]", "optimizer.betas"),
        ("optimizer.lr=inf", "optimizer.lr must be a finite number > 0, got inf"),
        ("optimizer.lr=nan", "optimizer.lr must be a finite number > 0, got nan"),
        ("optimizer.weight_decay=inf", "optimizer.weight_decay must be a finite number"),
        ("optimizer.nesterov=true", "optimizer.nesterov=true needs optimizer.momentum > 0"),
        ("trainer.seed=18446744073709551616", "trainer.seed must be in [0, 2**64)"),
        ("trainer.seed=-1", "trainer.seed must be in [0, 2**64)"),
        ("data.split_seed=-1", "data.split_seed must be in [0, 2**64)"),
        ("+optimizer.foo=1", "optimizer.foo is not an argument of torch.optim.SGD"),
        ("+model.bar=2", "model.bar is not an argument of fashion_sweep.model.NeuralNetwork"),
        ("+data.foo=1", "data.foo is not a key of data"),
        ("+trainer.foo=1", "trainer.foo is not a key of trainer"),
        ("+foo=1", "foo is not a key of the config"),
    ],
)
def test_validate_rejects_values_and_names_the_key(compose, override, named):
    with pytest.raises(ConfigError) as caught:
        validate(compose(*override.split()))
    assert named in str(caught.value)
    assert caught.value.keys[0] in override  # what a sweep checks against its space


@pytest.mark.parametrize(
    "overrides",
    [
        ["optimizer.nesterov=true", "optimizer.momentum=0.9"],
        ["trainer.seed=18446744073709551615"],
        ["optimizer=adam", "+optimizer.amsgrad=true"],  # an argument Adam takes: it works
    ],
)
def test_validate_accepts_what_torch_runs(compose, overrides):
    validate(compose(*overrides))
