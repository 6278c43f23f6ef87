"""The Optuna sweeper as a Hydra plugin: hydra-optuna-sweeper's configuration, our own
scheduling.

Selected by conf/sweep/optuna.yaml (`override /hydra/sweeper: study`), registered with
Hydra by the entry point in pyproject.toml. Hydra imports this module whenever it
looks for plugins, single runs included, so it holds only the configuration and the
plugin; the sweep itself (loop.py: Optuna, MLflow) is imported when a sweep starts.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import MISSING, DictConfig

from fashion_sweep.sweeps.compose import ComposeOnce
from fashion_sweep.sweeps.settings import NO_PRUNER, Settings


@dataclass
class PrunerConf:
    _target_: str = NO_PRUNER  # none: every trial runs all its epochs


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
class ConfirmConf:
    # after the search, the top_k configurations by the optimized metric are each trained
    # `seeds` more times with new seeds, and the winner is chosen by their mean
    # (docs/sweeps.md, Confirmed winners); 0: no confirmation stage
    top_k: int = 0
    seeds: int = 5
    # the key each confirmation run's new seed is set on; null: the app's own
    # (fashion_sweep.train's trainer.seed), and for any other app confirmation needs it
    seed_key: str | None = None


@dataclass
class StudySweeperConf(OptunaSweeperConf):
    _target_: str = "fashion_sweep.sweeps.plugin.StudySweeper"
    defaults: list[Any] = dataclasses.field(
        default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}]
    )
    # hydra/sweeper/pruner=median|successive_halving|hyperband stops hopeless trials
    # after an epoch (docs/sweeps.md, Pruning); none runs every trial in full
    pruner: Any = MISSING
    # Each worker records a heartbeat per running trial every heartbeat_interval
    # seconds; a trial silent for grace_period seconds is failed (crashed) and run again.
    heartbeat_interval: int = 10
    grace_period: int = 60
    # file: each trial's output (the tutorial's lines, warnings, a traceback) in its trial
    # folder's train.log, and one line per ended trial on the console; console: the
    # trials' output on the console, as a plain multirun prints it
    trial_output: str = "file"
    confirm: ConfirmConf = dataclasses.field(default_factory=ConfirmConf)
    # what the sweep asks of the app (fashion_sweep/sweeps/apps.py): null, any Hydra app
    # (the task function returns the value); conf/sweep/optuna.yaml names this project's
    app: str | None = None


ConfigStore.instance().store(
    group="hydra/sweeper", name="study", node=StudySweeperConf, provider="fashion_sweep"
)
for _name, _node in PRUNERS.items():
    ConfigStore.instance().store(
        group="hydra/sweeper/pruner", name=_name, node=_node, provider="fashion_sweep"
    )


class StudySweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = Settings.of(settings)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        # the launcher composes each trial's config through this loader: once per sweep
        self.compose = ComposeOnce(hydra_context.config_loader)
        hydra_context = dataclasses.replace(hydra_context, config_loader=self.compose)
        from fashion_sweep.sweeps.apps import task

        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context,
            task_function=task(self.settings.app, task_function),
            config=config,
        )

    def sweep(self, arguments: list[str]) -> None:
        self.settings.check()
        from fashion_sweep import signals
        from fashion_sweep.sweeps.apps import ours
        from fashion_sweep.sweeps.loop import Sweep

        sweep = Sweep(self.settings, self.config, self.launcher, self.compose)
        if ours(self.settings.app):  # its entry point handles signals (mistakes.run)
            sweep.run(arguments)
            return
        # SIGTERM and SIGHUP end another app's sweep as Ctrl-C does: its trials cut off,
        # one line, the process ended by the signal
        try:
            with signals.interrupts():
                sweep.run(arguments)
        except KeyboardInterrupt as stop:
            print(f"error: {signals.reason(stop)}", file=sys.stderr)
            signals.exit_like(stop)
