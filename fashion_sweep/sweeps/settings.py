"""The sweeper's settings (hydra.sweeper.*, conf/sweep/optuna.yaml), checked before
anything is opened, and the error a sweep stops with."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from fashion_sweep.mistakes import Failed
from fashion_sweep.sweeps.trial_output import CONSOLE, TO_FILE

NO_PRUNER = "optuna.pruners.NopPruner"
HYPERBAND = "optuna.pruners.HyperbandPruner"


class SweepError(CompactHydraException):
    """A sweep that cannot start as asked: one line, exit status 2 (mistakes.run)."""


class SweepFailed(SweepError, Failed):
    """A sweep that started and must stop (too many failed trials): exit status 1."""


@dataclass
class Settings:
    sampler: DictConfig
    direction: Any
    storage: str | None
    study_name: str | None
    n_trials: int
    n_jobs: int
    max_failure_rate: float
    custom_search_space: str | None
    params: DictConfig | None
    heartbeat_interval: int
    grace_period: int
    pruner: DictConfig | None = None
    trial_output: str = "file"
    confirm: DictConfig | None = None
    app: str | None = None

    @classmethod
    def of(cls, settings: dict[str, Any]) -> Settings:
        """The sweeper's settings. A key that is not one of them, added with
        `+hydra.sweeper.KEY=...` (Hydra refuses it without the `+`), is refused in
        Hydra's words."""
        known = sorted(field.name for field in dataclasses.fields(cls))
        for key in settings:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" Did you mean: '{close[0]}'?" if close else ""
                raise SweepError(
                    f"Could not add 'hydra.sweeper.{key}': Key '{key}' not in "
                    f"'StudySweeperConf'.{hint}"
                )
        return cls(**settings)

    @property
    def top_k(self) -> int:
        """How many configurations the confirmation stage trains again (0: none)."""
        return int(self.confirm.top_k) if self.confirm else 0

    @property
    def seeds(self) -> int:
        return int(self.confirm.seeds) if self.confirm else 0

    @property
    def seed(self) -> int | None:
        return self.sampler.get("seed")

    @property
    def trials_to_file(self) -> bool:
        """Whether each trial's output goes to its folder's log (trial_output.py)."""
        return self.trial_output == TO_FILE

    @property
    def prunes(self) -> bool:
        return bool(self.pruner) and self.pruner._target_ != NO_PRUNER

    def check(self) -> None:
        """The sweeper's own numbers, before anything is opened."""
        seed = self.seed  # numpy's generators, under Optuna's samplers
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
            (
                isinstance(self.top_k, int) and self.top_k >= 0,
                f"hydra.sweeper.confirm.top_k must be >= 0, got {self.top_k}",
            ),
            (
                not self.top_k or self.seeds >= 2,
                f"hydra.sweeper.confirm.seeds must be >= 2 (a spread needs two runs), "
                f"got {self.seeds}",
            ),
            (
                self.trial_output in (TO_FILE, CONSOLE),
                f"hydra.sweeper.trial_output must be file or console, got {self.trial_output}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SweepError(message)
        self.make_pruner()

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
        if self.pruner._target_ == HYPERBAND:  # Optuna checks these late
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
