"""A sweep's search space: hydra-optuna-sweeper's grammar parsed into Optuna
distributions, each bad parameter named; the direction checked against the metric; the
points of a finite space."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from fashion_sweep.sweeps.settings import SweepError

MAX_POINTS = 100_000  # a finite space larger than this is treated as infinite


@dataclass
class Space:
    searched: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)  # `key=value` as parsed (strings)
    fixed_overrides: list[str] = field(default_factory=list)  # deletes (~key), as typed


def parse(params: list[str], config: DictConfig) -> Space:
    """hydra-optuna-sweeper's parsing, with each bad parameter named in the error."""
    space = Space()
    for line in params:
        try:
            (override,) = OverridesParser.create().parse_overrides([line])
        except HydraException as error:
            raise SweepError(f"sweep parameter {line!r}: {error}") from None
        if override.is_delete():
            space.fixed_overrides.append(line)
            continue
        key = override.get_key_element()
        if not key.startswith("+") and not exists(config, key):
            raise SweepError(f"sweep parameter {key!r} is not a key of the config")
        try:
            value = create_optuna_distribution_from_override(override)
        except (ValueError, AssertionError) as error:
            raise SweepError(f"sweep parameter {key!r} ({line}): {error}") from None
        if isinstance(value, BaseDistribution):
            space.searched[key] = value
        else:
            space.fixed[key] = value
    for key in space.fixed:
        space.searched.pop(key, None)
    return space


def exists(config: Any, key: str) -> bool:
    if key in config.hydra.runtime.choices:  # a config group, e.g. optimizer=choice(sgd,adam)
        return True
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(config, parent) if parent else config
    return node is not None and leaf in node


def directions(
    setting: Any, metrics: list[str] | None, needs: Callable[[str], str | None]
) -> list[str]:
    """hydra.sweeper.direction as a list, one per metric (`metrics`: the app's names;
    None: as many as directions are given), each the direction its metric `needs`
    (apps.App.direction; None: any)."""
    given = (
        list(setting)
        if isinstance(setting, list | tuple) or OmegaConf.is_list(setting)
        else [setting]
    )
    given = [str(getattr(d, "name", d)).lower() for d in given]
    for d in given:
        if d not in ("minimize", "maximize"):
            raise SweepError(f"hydra.sweeper.direction: {d} is neither minimize nor maximize")
    if metrics is not None and len(given) != len(metrics):
        raise SweepError(
            f"hydra.sweeper.direction gives {len(given)} direction(s) for "
            f"{len(metrics)} metric(s) ({', '.join(metrics)}): one per metric"
        )
    for i, (d, metric) in enumerate(zip(given, metrics or [], strict=False)):
        expected = needs(metric)
        if expected is not None and d != expected:
            where = "direction" if len(given) == 1 else f"direction[{i}]"
            raise SweepError(f"hydra.sweeper.{where}={d} would {d} {metric}; set it to {expected}")
    return given


def related(keys: tuple[str, ...], space: dict[str, BaseDistribution]) -> bool:
    """Whether an error about `keys` may depend on the searched values: a key of the
    space, inside one (`optimizer` for `optimizer=choice(sgd,adam)`), or holding one."""
    searched = [name.lstrip("+~") for name in space]
    return any(
        key == name or key.startswith(f"{name}.") or name.startswith(f"{key}.")
        for key in keys
        for name in searched
    )


def some_value(distribution: BaseDistribution) -> Any:
    """A value the search space holds: its first choice, or its low end."""
    choices = getattr(distribution, "choices", None)
    return choices[0] if choices else distribution.low


def size(space: dict[str, BaseDistribution]) -> int | None:
    """How many configurations a finite space holds (counted, not listed: an int range
    may hold billions); None if it is not finite."""
    each = [_count(distribution) for distribution in space.values()]
    return None if any(n is None for n in each) else math.prod(each)


def _count(distribution: BaseDistribution) -> int | None:
    if isinstance(distribution, CategoricalDistribution):
        return len(distribution.choices)
    if isinstance(distribution, IntDistribution):
        return len(range(distribution.low, distribution.high + 1, distribution.step))
    if isinstance(distribution, FloatDistribution) and distribution.step is not None:
        return round((distribution.high - distribution.low) / distribution.step) + 1
    return None


def points(space: dict[str, BaseDistribution]) -> list[dict[str, Any]] | None:
    """Every configuration of a finite space, or None if it is not finite (or huge)."""
    counted = size(space)
    if counted is None or counted > MAX_POINTS:
        return None
    each = {name: values(distribution) for name, distribution in space.items()}
    return [dict(zip(each, combo, strict=True)) for combo in itertools.product(*each.values())]


def values(distribution: BaseDistribution) -> list[Any] | None:
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, IntDistribution):
        return list(range(distribution.low, distribution.high + 1, distribution.step))
    if isinstance(distribution, FloatDistribution) and distribution.step is not None:
        count = round((distribution.high - distribution.low) / distribution.step) + 1
        return [distribution.low + k * distribution.step for k in range(count)]
    return None


def describe(distribution: BaseDistribution) -> str:
    """A searched parameter as the parent run's param shows it: `choice(32, 64)`,
    `log-uniform(0.0001, 0.1)`, `int(1, 8, step 1)`."""
    if isinstance(distribution, CategoricalDistribution):
        return f"choice({', '.join(map(str, distribution.choices))})"
    kind = "int" if isinstance(distribution, IntDistribution) else "uniform"
    if getattr(distribution, "log", False):
        kind = f"log-{kind}"
    step = f", step {distribution.step}" if distribution.step not in (None, 1) else ""
    return f"{kind}({distribution.low}, {distribution.high}{step})"
