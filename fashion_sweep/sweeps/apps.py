"""What a sweep asks of the app whose trials it runs, named by `hydra.sweeper.app`.

`App` (hydra.sweeper.app=null) is any Hydra app, as hydra-optuna-sweeper runs it: a
trial's value is what its task function returns (one number, or one per direction),
nothing is checked before the first trial, and no MLflow run is made. Each trial learns
its place in the study from its environment (FASHION_SWEEP_STUDY, FASHION_SWEEP_TRIAL,
set through hydra.job.env_set), which `fashion_sweep.sweeps.trial.report` reads to
prune. `FashionSweepApp` (conf/sweep/optuna.yaml) is this project's app: its checks
before the first trial, the MLflow parent run and one child run per trial (the trial's
place passed as tracking.* overrides), its seed for the confirmation stage, its model
registered. docs/any-app.md says what another app gets and how to opt in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hydra.utils import get_class
from omegaconf import DictConfig

from fashion_sweep.sweeps.settings import SweepError

if TYPE_CHECKING:
    from fashion_sweep.sweeps.compose import ComposeOnce
    from fashion_sweep.sweeps.space import Space

STUDY, TRIAL = "FASHION_SWEEP_STUDY", "FASHION_SWEEP_TRIAL"


class App:
    """Any Hydra app."""

    # whether each trial's output goes to its folder's log (hydra.sweeper.trial_output=
    # file); any app: its output is its own, on the console
    logs_trials = False

    def __init__(self, config: DictConfig) -> None:
        self.config = config

    @property
    def tracking_uri(self) -> str | None:
        """MLflow's store for the sweep's parent run and its trials' runs; None: no runs."""
        return None

    def metrics(self) -> list[str] | None:
        """The names of a trial's values, one per direction, each checked against its
        direction; None: as many values as directions, named `value` (`value_0`, ...)."""
        return None

    def seed_key(self, confirm: DictConfig | None) -> str | None:
        """The key a confirmation run's new seed is set on (hydra.sweeper.confirm.seed_key)."""
        return confirm.get("seed_key") if confirm is not None else None

    def seed(self, key: str) -> Any:
        """The seed the app's config gives `key`: no confirmation run takes it."""
        from omegaconf import OmegaConf

        return OmegaConf.select(self.config, key)

    def check(self, compose: ComposeOnce, searched: Space) -> None:
        """A trial's config checked before any store opens; any app: only that it asks
        for nothing this project's app alone has."""
        launcher = str(self.config.hydra.launcher.get("_target_", ""))
        if launcher.startswith("fashion_sweep.launchers."):
            raise SweepError(
                "hydra/launcher=packed trains fashion_sweep.train's model in packs: it runs "
                "no other app's trials"
            )

    def overrides(
        self, study: str, number: int, parent: str | None, label: str, confirms: int | None
    ) -> list[str]:
        """What a trial's job gets besides its values: its place in the study."""
        return [
            f"++hydra.job.env_set.{STUDY}='{study}'",
            f"++hydra.job.env_set.{TRIAL}='{number}'",
        ]


class FashionSweepApp(App):
    """fashion_sweep.train: config.optimized_metric, config.tracking, trainer.seed."""

    logs_trials = True

    @property
    def tracking_uri(self) -> str | None:
        return str(self.config.tracking.uri)

    def metrics(self) -> list[str] | None:
        metric = self.config.optimized_metric
        return [metric] if isinstance(metric, str) else list(metric)

    def seed_key(self, confirm: DictConfig | None) -> str | None:
        return super().seed_key(confirm) or "trainer.seed"

    def check(self, compose: ComposeOnce, searched: Space) -> None:
        from fashion_sweep.sweeps.opening import preflight

        preflight(self.config, compose, searched)

    def overrides(
        self, study: str, number: int, parent: str | None, label: str, confirms: int | None
    ) -> list[str]:
        return [
            f"tracking.parent_run_id='{parent}'",
            f"tracking.trial={number}",
            f"tracking.study='{study}'",
            f"tracking.run_name='{label}'",
            *([f"tracking.confirms={confirms}"] if confirms is not None else []),
        ]


def make(name: str | None, config: DictConfig) -> App:
    """The app hydra.sweeper.app names (a class path), or any Hydra app for null."""
    if not name:
        return App(config)
    try:
        chosen = get_class(name)
    except Exception as error:
        raise SweepError(f"hydra.sweeper.app={name}: {str(error).splitlines()[0]}") from None
    if not (isinstance(chosen, type) and issubclass(chosen, App)):
        raise SweepError(f"hydra.sweeper.app={name} is no fashion_sweep.sweeps.apps.App")
    return chosen(config)
