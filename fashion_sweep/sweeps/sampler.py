"""The sweep's sampler: the one hydra.sweeper.sampler names, its arguments checked before
any store opens, seeded afresh for each trial from (seed, trial number) so that workers
and resumes that start the same sampler never draw the same sequence."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

import optuna
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from fashion_sweep.sweeps.schedule import confirming, trial_seed
from fashion_sweep.sweeps.settings import SweepError
from fashion_sweep.sweeps.space import values

SAMPLERS = ("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*")
# Samplers whose seed fixes one sequence of points that trials take by number or by what
# is left (the same in every process): seeded once, not per trial.
SEQUENCES = (optuna.samplers.GridSampler, optuna.samplers.QMCSampler)


NEEDS = {optuna.samplers.CmaEsSampler: "cmaes"}


def make_sampler(config: DictConfig, space: dict[str, BaseDistribution]) -> BaseSampler:
    """The configured sampler (for how many trials a finite space can give, any
    sampler's: space.size)."""
    try:
        make = instantiate(config, _partial_=True, _execution_whitelist_=SAMPLERS)
    except HydraException as error:
        raise SweepError(f"hydra.sweeper.sampler: {str(error).splitlines()[0]}") from None
    kind = make.func
    if kind is optuna.samplers.GridSampler:  # the grid sampler wants the space
        grid = {name: values(d) for name, d in space.items()}
        if any(v is None for v in grid.values()):
            raise SweepError("the grid sampler needs a finite search space (choice, range)")
        make = functools.partial(make, grid)
    try:
        first = make()  # its arguments, checked here, before any store opens
    except (TypeError, ValueError) as error:
        raise SweepError(f"hydra.sweeper.sampler: {str(error).splitlines()[0]}") from None
    needs = NEEDS.get(kind)  # an optional package, which Optuna imports at the first ask
    if needs and importlib.util.find_spec(needs) is None:
        raise SweepError(
            f"hydra.sweeper.sampler: {kind.__name__} needs the package {needs}, which is "
            f"not installed here (pip install {needs})"
        )
    if kind in SEQUENCES:
        return first
    return PerTrialSeed(make, config.get("seed"))


class SearchOnly:
    """A study as a sampler sees it: without its confirmation trials (confirm.py), which
    repeat the best configurations with other seeds and would weigh them twice."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def get_trials(self, *args: Any, **kwargs: Any) -> list[FrozenTrial]:
        return [t for t in self._study.get_trials(*args, **kwargs) if not confirming(t)]

    def _get_trials(self, *args: Any, **kwargs: Any) -> list[FrozenTrial]:
        return [t for t in self._study._get_trials(*args, **kwargs) if not confirming(t)]

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()


class PerTrialSeed(BaseSampler):
    """The configured sampler, made afresh for each trial with the seed
    schedule.trial_seed(seed, trial number): reproducible for a seed, and never the same
    draws for two trials, whichever process or resume asks for them. It learns from the
    search's trials alone (SearchOnly)."""

    def __init__(self, make: Callable[..., BaseSampler], seed: int | None) -> None:
        self._make, self._seed = make, seed
        self._sampler = make(seed=seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._sampler = self._make(seed=trial_seed(self._seed, trial.number))
        self._sampler.before_trial(SearchOnly(study), trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        return self._sampler.infer_relative_search_space(SearchOnly(study), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, space: dict) -> dict:
        return self._sampler.sample_relative(SearchOnly(study), trial, space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, name: str, distribution: BaseDistribution
    ) -> Any:
        return self._sampler.sample_independent(SearchOnly(study), trial, name, distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any
    ) -> None:
        self._sampler.after_trial(SearchOnly(study), trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()
