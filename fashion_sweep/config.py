"""Typed schemas for conf/, stored once each in Hydra's ConfigStore, value checks, and
how an override is recorded.

The yaml files under conf/ carry the values; these dataclasses carry the types, so a
misspelt key or a wrong type fails at composition with Hydra naming the key. What a
type cannot say (lr > 0, a subset no larger than its split) is checked by validate().
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Absolute, so Hydra finds it however the entry point was imported.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
TRAIN_IMAGES = 60_000
TEST_IMAGES = 10_000
METRICS = {"train/loss", "val/loss", "val/accuracy", "test/loss", "test/accuracy"}
# what optimized_metric may name: the metrics, and an epoch's cost (run.epoch_metrics)
OBJECTIVES = METRICS | {"perf/epoch_seconds", "perf/samples_per_second"}


class ConfigError(ValueError):
    """A config value that composes but cannot be run; the message names the key.

    `keys` are the config keys it is about: given, or the message's first word."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        found = re.match(r"[\w.]+", message)
        self.keys = keys or ((found.group(),) if found else ())


class Device(str, Enum):
    auto = "auto"  # cuda, then mps, then cpu
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Loader(str, Enum):
    torch = "torch"  # the tutorial: torchvision dataset + ToTensor + DataLoader
    resident = "resident"  # the split decoded once into a tensor on the device


@dataclass
class DataConfig:
    root: str = "data"  # holds FashionMNIST/raw/; prepared from Debian's copy if missing
    download: bool = False  # let torchvision download the data (needs the internet)
    loader: Loader = Loader.resident  # same numbers as torch, faster (docs/performance.md)
    batch_size: int = 64
    shuffle: bool = False  # the tutorial does not shuffle
    num_workers: int = 0  # DataLoader worker processes (loader=torch only)
    train_size: int | None = None  # first N training images; null: all that are left
    val_size: int = 0  # images carved out of the training set, seeded by split_seed
    test_size: int | None = None  # first N test images; null: all 10,000
    split_seed: int = 0  # fixed apart from trainer.seed so every trial sees one split


@dataclass
class ModelConfig:
    _target_: str = "fashion_sweep.model.NeuralNetwork"
    width: int = 512  # hidden units per layer
    depth: int = 2  # hidden layers


@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False


@dataclass
class AdamConfig:
    _target_: str = "torch.optim.Adam"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class AdamWConfig(AdamConfig):
    _target_: str = "torch.optim.AdamW"
    weight_decay: float = 0.01


@dataclass
class TrainerConfig:
    epochs: int = 5
    device: Device = Device.auto
    seed: int = 0  # seeds the weights and the shuffle order
    log_interval: int = 100  # batches between progress lines (and host syncs)
    cuda_graph: bool = False  # capture the train step in a CUDA graph and replay it
    # take the CPU's cores in shares with this machine's other training processes, at
    # each epoch (fashion_sweep/threads.py); off: torch's thread per core, whose
    # rounding does not depend on what else trains here
    share_cores: bool = False


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"  # MLflow's own default: `mlflow ui` here shows it
    experiment: str = "fashion_sweep"
    run_name: str | None = None
    log_model: bool = True  # log model.pth (the state_dict) as an artifact
    # a sweep's best trial, logged as an MLflow Model on the sweep's run and registered
    # under this name (models:/<name>/latest: the newest sweep's); null: neither
    registered_model: str | None = "fashion_sweep"
    # Set by the sweeper for each trial; not for the command line.
    parent_run_id: str | None = None
    trial: int | None = None
    study: str | None = None  # the Optuna study the trial belongs to
    confirms: int | None = None  # the search trial a confirmation run trains again


@dataclass
class TrainConfig:
    data: Any = MISSING
    model: Any = MISSING
    optimizer: Any = MISSING
    trainer: Any = MISSING
    tracking: Any = MISSING
    # The metric train() returns to Hydra (and so to the sweeper): a `split/name` key;
    # or a list of them, one per hydra.sweeper.direction (a multi-objective sweep)
    optimized_metric: Any = "test/accuracy"


@dataclass
class PredictConfig:
    data: Any = MISSING
    tracking: Any = MISSING
    run_id: str = "latest"  # a run id, `latest`, or `best` (the last sweep's best trial)
    index: int = 0  # which test image


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optimizer": {"lr": 1e-3}} -> {"optimizer.lr": 1e-3}"""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def register_configs() -> None:
    """Stores each schema once; calling it again (train imports predict) replaces."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig, replace=True)
    cs.store(name="predict_schema", node=PredictConfig, replace=True)
    cs.store(group="data", name="data_schema", node=DataConfig, replace=True)
    cs.store(group="model", name="mlp_schema", node=ModelConfig, replace=True)
    cs.store(group="optimizer", name="sgd_schema", node=SGDConfig, replace=True)
    cs.store(group="optimizer", name="adam_schema", node=AdamConfig, replace=True)
    cs.store(group="optimizer", name="adamw_schema", node=AdamWConfig, replace=True)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig, replace=True)
    cs.store(group="tracking", name="tracking_schema", node=TrackingConfig, replace=True)


SEEDS = 2**64  # torch's generators take seeds below this
# Config groups whose keys are their schema's fields (the rest: their _target_'s arguments)
SCHEMAS = {"data": DataConfig, "trainer": TrainerConfig, "tracking": TrackingConfig}
SET_BY_TRAIN = {"params"}  # what train() passes to the optimizer itself


def _check(ok: bool, message: str, *keys: str) -> None:
    if not ok:
        raise ConfigError(message, keys)


def _number(cfg: DictConfig, path: str, low: float, strict: bool = False) -> None:
    value = OmegaConf.select(cfg, path)
    ok = math.isfinite(value) and (value > low if strict else value >= low)
    relation = ">" if strict else ">="
    _check(ok, f"{path} must be a finite number {relation} {low:g}, got {value}")


def _known_keys(cfg: DictConfig) -> None:
    """A key added with `+` (`+optimizer.foo=1`) must be one the code reads: a field of
    the group's schema, or an argument of the class its _target_ names."""
    top = sorted(set(cfg) - {f.name for f in fields(TrainConfig)} - {"hydra"})
    _check(not top, f"{top[0] if top else ''} is not a key of the config")
    for group, schema in SCHEMAS.items():
        extra = sorted(set(cfg[group]) - {f.name for f in fields(schema)})
        _check(not extra, f"{group}.{extra[0] if extra else ''} is not a key of {group}")
    for group in ("model", "optimizer"):
        target = cfg[group]._target_
        try:
            accepted = inspect.signature(get_class(target)).parameters
        except Exception:  # not importable: instantiate() says so
            continue
        if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
            continue
        names = set(accepted) - SET_BY_TRAIN
        for key in cfg[group]:
            _check(
                key == "_target_" or key in names,
                f"{group}.{key} is not an argument of {target} "
                f"(it takes: {', '.join(sorted(names))})",
            )


def _resolvable(cfg: DictConfig) -> None:
    """Every value the run reads has one (not ???) and resolves (${oops}, an unset
    ${oc.env:...}); Hydra's own are not the run's (a sweep's job dir names its trial)."""
    keys = [key for key in cfg if key != "hydra"]
    missing = sorted(key for key in keys if OmegaConf.is_missing(cfg, key))
    try:
        nodes = [cfg[key] for key in keys if key not in missing]  # resolves plain values
        for node in (n for n in nodes if OmegaConf.is_config(n)):
            missing += sorted(OmegaConf.missing_keys(node))  # full keys
        _check(not missing, f"{', '.join(missing)}: no value given (???): set it", *missing)
        for node in (n for n in nodes if OmegaConf.is_config(n)):
            OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"a value cannot be resolved: {str(error).splitlines()[0]}") from None


def validate(cfg: DictConfig) -> None:
    """Checks what the schema's types cannot; raises ConfigError naming the key."""
    _resolvable(cfg)
    data, opt, trainer = cfg.data, cfg.optimizer, cfg.trainer
    _known_keys(cfg)
    _number(cfg, "optimizer.lr", 0, strict=True)
    for key in ("momentum", "weight_decay", "eps"):
        if key in opt:
            _number(cfg, f"optimizer.{key}", 0)
    _check(
        not opt.get("nesterov") or opt.get("momentum", 0) > 0,
        f"optimizer.nesterov=true needs optimizer.momentum > 0, got {opt.get('momentum')}",
        "optimizer.nesterov",
        "optimizer.momentum",
    )
    if "betas" in opt:
        _check(
            len(opt.betas) == 2 and all(0 <= b < 1 for b in opt.betas),
            f"optimizer.betas must be two numbers in [0, 1), got {list(opt.betas)}",
        )
    for path in ("trainer.seed", "data.split_seed"):
        seed = OmegaConf.select(cfg, path)
        _check(0 <= seed < SEEDS, f"{path} must be in [0, 2**64), got {seed}")
    _check(cfg.model.width > 0, f"model.width must be > 0, got {cfg.model.width}")
    _check(cfg.model.depth >= 0, f"model.depth must be >= 0, got {cfg.model.depth}")
    _check(data.batch_size > 0, f"data.batch_size must be > 0, got {data.batch_size}")
    _check(data.num_workers >= 0, f"data.num_workers must be >= 0, got {data.num_workers}")
    _check(
        0 <= data.val_size < TRAIN_IMAGES,
        f"data.val_size must be in [0, {TRAIN_IMAGES}), got {data.val_size}",
    )
    left = TRAIN_IMAGES - data.val_size
    if data.train_size is not None:
        _check(
            0 < data.train_size <= left,
            f"data.train_size must be in [1, {left}] (60000 minus data.val_size), "
            f"got {data.train_size}",
        )
    if data.test_size is not None:
        _check(
            0 < data.test_size <= TEST_IMAGES,
            f"data.test_size must be in [1, {TEST_IMAGES}], got {data.test_size}",
        )
    _check(trainer.epochs > 0, f"trainer.epochs must be > 0, got {trainer.epochs}")
    _check(
        trainer.log_interval > 0, f"trainer.log_interval must be > 0, got {trainer.log_interval}"
    )
    metrics = optimized(cfg)
    _check(
        len(set(metrics)) == len(metrics) > 0,
        f"optimized_metric: a metric, or a list of distinct ones, got {metrics}",
    )
    for metric in metrics:
        _check(
            metric in OBJECTIVES,
            f"optimized_metric must be one of {sorted(OBJECTIVES)}, got {metric}",
        )
        _check(
            not metric.startswith("val/") or data.val_size > 0,
            f"optimized_metric={metric} needs a validation split: set data.val_size > 0",
            "optimized_metric",
            "data.val_size",
        )


def optimized(cfg: DictConfig) -> list[str]:
    """optimized_metric as a list: one metric, or a multi-objective sweep's several."""
    metric = cfg.optimized_metric
    return [metric] if isinstance(metric, str) else [str(m) for m in metric]


@functools.cache
def parser() -> OverridesParser:  # one per process: making one costs a third of a parse
    return OverridesParser.create()


def plain(line: str) -> str:
    """An override as a user would type it: `tracking.uri=sqlite\\:////x.db` (the
    escaped form Hydra and the Optuna sweeper write) as `tracking.uri=sqlite:////x.db`,
    where that parses to the same value; any other line as it is."""
    if "\\" not in line:
        return line
    try:
        (override,) = parser().parse_overrides([line])
        value = override.value()
        if not isinstance(value, str) or override.is_sweep_override():
            return line
        key = line.split("=", 1)[0]
        simpler = f"{key}={value}"
        (again,) = parser().parse_overrides([simpler])
        return simpler if again.value() == value else line
    except Exception:  # not an override this grammar reads: keep it
        return line
