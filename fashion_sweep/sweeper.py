"""The Optuna sweeper: hydra-optuna-sweeper's configuration, our own scheduling.

Selected by conf/sweep/optuna.yaml (`override /hydra/sweeper: study`), registered with
Hydra by the entry point in pyproject.toml. Hydra imports this module whenever it
looks for plugins, single runs included, so it holds only the configuration and the
plugin; the sweep itself (fashion_sweep/sweep.py: Optuna, MLflow) is imported when a
sweep starts. What it adds to hydra-optuna-sweeper is in the README (Sweeps).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import MISSING, DictConfig

from fashion_sweep.compose import ComposeOnce


@dataclass
class PrunerConf:
    _target_: str = "optuna.pruners.NopPruner"  # none: every trial runs all its epochs


@dataclass
class MedianPrunerConf(PrunerConf):
    """Stops a trial whose value at an epoch is worse than the median of the trials
    before it at that epoch."""

    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5  # trials that run in full before any is pruned
    n_warmup_steps: int = 0  # epochs of a trial never pruned after (0: from epoch 1 on)
    interval_steps: int = 1  # epochs between checks
    n_min_trials: int = 1  # trials that must have reached an epoch to compare with


@dataclass
class SuccessiveHalvingPrunerConf(PrunerConf):
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: int | str = "auto"  # epochs before the first rung; auto: from trials
    reduction_factor: int = 4  # 1 in this many trials goes on at each rung
    min_early_stopping_rate: int = 0
    bootstrap_count: int = 0


@dataclass
class HyperbandPrunerConf(PrunerConf):
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1  # epochs
    max_resource: int | str = "auto"  # epochs; auto: trainer.epochs, as trials report
    reduction_factor: int = 3
    bootstrap_count: int = 0


PRUNERS = {
    "none": PrunerConf,
    "median": MedianPrunerConf,
    "successive_halving": SuccessiveHalvingPrunerConf,
    "hyperband": HyperbandPrunerConf,
}


@dataclass
class StudySweeperConf(OptunaSweeperConf):
    _target_: str = "fashion_sweep.sweeper.StudySweeper"
    defaults: list[Any] = dataclasses.field(
        default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}]
    )
    # hydra/sweeper/pruner=median|successive_halving|hyperband stops hopeless trials
    # after an epoch (README, Pruning); none runs every trial in full
    pruner: Any = MISSING
    # Each worker records a heartbeat per running trial every heartbeat_interval
    # seconds; a trial silent for grace_period seconds is failed (crashed) and run again.
    heartbeat_interval: int = 10
    grace_period: int = 60


ConfigStore.instance().store(
    group="hydra/sweeper", name="study", node=StudySweeperConf, provider="fashion_sweep"
)
for _name, _node in PRUNERS.items():
    ConfigStore.instance().store(
        group="hydra/sweeper/pruner", name=_name, node=_node, provider="fashion_sweep"
    )


class SweepError(CompactHydraException):
    """A sweep that cannot start or must stop; Hydra prints just this message."""


class StudySweeper(Sweeper):
    def __init__(
        self,
        sampler: DictConfig,
        direction: Any,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        custom_search_space: str | None,
        params: DictConfig | None,
        heartbeat_interval: int,
        grace_period: int,
        pruner: DictConfig | None = None,
    ) -> None:
        self.sampler = sampler
        self.direction = direction
        self.storage = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.custom_search_space = custom_search_space
        self.params = params
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.pruner = pruner

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        # the launcher composes each trial's config through this loader: once per sweep
        self.compose = ComposeOnce(hydra_context.config_loader)
        self.hydra_context = dataclasses.replace(hydra_context, config_loader=self.compose)
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=self.hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        self.check()
        from fashion_sweep.sweep import Sweep

        Sweep(self, arguments).run()

    def check(self) -> None:
        """The sweeper's own numbers, before anything is opened."""
        seed = self.sampler.get("seed")  # numpy's generators, under Optuna's samplers
        checks = [
            (self.n_trials >= 1, f"hydra.sweeper.n_trials must be >= 1, got {self.n_trials}"),
            (self.n_jobs >= 1, f"hydra.sweeper.n_jobs must be >= 1, got {self.n_jobs}"),
            (
                0 <= self.max_failure_rate <= 1,
                f"hydra.sweeper.max_failure_rate must be in [0, 1], got {self.max_failure_rate}",
            ),
            (
                self.heartbeat_interval >= 1,
                f"hydra.sweeper.heartbeat_interval must be >= 1, got {self.heartbeat_interval}",
            ),
            (
                self.grace_period > self.heartbeat_interval,
                f"hydra.sweeper.grace_period must be more than heartbeat_interval "
                f"({self.heartbeat_interval}), got {self.grace_period}",
            ),
            (
                seed is None or (isinstance(seed, int) and 0 <= seed < 2**32),
                f"hydra.sweeper.sampler.seed must be in [0, 2**32) or null, got {seed}",
            ),
            (
                self.storage is None or isinstance(self.storage, str),
                "hydra.sweeper.storage must be a database URL or null",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SweepError(message)
        self.make_pruner()

    @property
    def prunes(self) -> bool:
        return bool(self.pruner) and self.pruner._target_ != PrunerConf._target_

    def make_pruner(self) -> Any:
        """The configured Optuna pruner; its arguments checked, in one line."""
        from hydra.utils import instantiate

        if not self.pruner:
            return None
        if self.prunes and self.storage is None:
            raise SweepError(
                "hydra.sweeper.pruner needs a study its trials can reach: set "
                "hydra.sweeper.storage to a database (sqlite:///optuna.db), not null"
            )
        if self.pruner._target_ == HyperbandPrunerConf._target_:  # Optuna checks these late
            low, high = self.pruner.min_resource, self.pruner.max_resource
            for ok, what in (
                (low >= 1, f"min_resource must be >= 1, got {low}"),
                (
                    high == "auto" or (isinstance(high, int) and high >= low),
                    f"max_resource must be 'auto' or >= min_resource, got {high}",
                ),
                (
                    self.pruner.reduction_factor >= 2,
                    f"reduction_factor must be >= 2, got {self.pruner.reduction_factor}",
                ),
            ):
                if not ok:
                    raise SweepError(f"hydra.sweeper.pruner: {what}")
        try:
            return instantiate(self.pruner, _execution_whitelist_=["optuna.pruners.*"])
        except Exception as error:
            raise SweepError(f"hydra.sweeper.pruner: {str(error).splitlines()[0]}") from None
