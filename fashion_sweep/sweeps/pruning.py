"""A trial's side of its study, in whatever process trains it: each epoch's value of the
optimized metric goes to its Optuna trial, and the study's pruner says whether to stop
(`pruning`); after each epoch the trial also asks whether the study still holds it as
running (`ended_elsewhere`): a resume that found its sweep worker gone has cut it off
and runs its configuration again, so it stops and its run stays as the sweep ended it.
Hydra's Optuna sweeper cannot do this (hydra #1710, #1954): its jobs never see their
trial; here every trial lives in the persistent study, which the job opens itself.

A pack's members report an epoch one after another, and Optuna's pruners read every
trial the study has not finished back from the database for each report: with 64
members running, a report cost 64 trials' reads. Their reports of one epoch are one
round (`one_round`, around run.train_epoch's reports): the study's trials are read
once, and kept up to date with what the round writes (the reports, the pruner's own
attributes), so each member is judged as it would be by reading the database. What
other workers write meanwhile is read at the next round."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Container, Iterator
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from fashion_sweep.sweeps import schedule, study
from fashion_sweep.sweeps.settings import NO_PRUNER
from fashion_sweep.sweeps.snapshot import Snapshot

# The studies this process reports into, by (storage, study, pruner): a worker's trials
# share the study and its storage.
_STUDIES: dict[tuple[Any, str, str], tuple[optuna.Study, Any, int]] = {}


class RoundReads(Snapshot):
    """What a pruning link reads its study through: during a round (`one_round`), the
    study's trials as one read at the round's first, with the trials this process wrote
    since read back (Snapshot); outside a round, the storage itself."""

    made: list[RoundReads] = []  # this process's, for one_round

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.in_round = False
        RoundReads.made.append(self)

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        if self.in_round and self._held is None:  # the round's one read
            trials = self.inner.get_all_trials(study_id, deepcopy=False)
            self._held, self._changed = {t.number: t for t in trials}, set()
        return super().get_all_trials(study_id, deepcopy=deepcopy, states=states)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        if self.in_round:  # from the round's trials, as BaseStorage finds it
            return super().get_best_trial(study_id)
        return self.inner.get_best_trial(study_id)  # the database's own query

    def round(self, started: bool) -> None:
        self.in_round, self._held = started, None


@contextlib.contextmanager
def one_round() -> Iterator[None]:
    """The members' reports of one epoch: each pruner reads the study from one read."""
    for view in RoundReads.made:
        view.round(True)
    try:
        yield
    finally:
        for view in RoundReads.made:
            view.round(False)


class Pruning:
    """The link of trial `number` to its study's pruner: `prune` for run.run_epochs."""

    def __init__(self, url: str, name: str, number: int, pruner: DictConfig) -> None:
        spec = json.dumps(OmegaConf.to_container(pruner, resolve=True), sort_keys=True)
        if (url, name, spec) not in _STUDIES:
            from hydra.utils import instantiate

            made = instantiate(json.loads(spec), _execution_whitelist_=["optuna.pruners.*"])
            _STUDIES[url, name, spec] = study.load(url, name, made, view=RoundReads)
        held, where, study_id = _STUDIES[url, name, spec]
        trial_id = where.get_trial_id_from_study_id_trial_number(study_id, number)
        self.trial = optuna.trial.Trial(held, trial_id)
        self.multi = len(held.directions) > 1

    def __call__(self, epoch: int, value: float, last: bool = False) -> bool:
        """Reports `value` for `epoch`; True if the trial should stop after it (never
        after its `last` epoch: it trained in full, so it is complete)."""
        self.trial.report(value, step=epoch)
        return not last and self.trial.should_prune()


def pruning(cfg: DictConfig, hydra_cfg: DictConfig) -> Pruning | None:
    """A trial's link to its study's pruner, where its sweep has one; None for a single
    run (which imports no Optuna), for a sweep without a pruner, and for a confirmation
    run (confirm.py: it runs in full, to be measured)."""
    from hydra.types import RunMode

    pruner = hydra_cfg.sweeper.get("pruner") if hydra_cfg.mode == RunMode.MULTIRUN else None
    if not pruner or pruner._target_ == NO_PRUNER or cfg.tracking.trial is None:
        return None
    if cfg.tracking.get("confirms") is not None:
        return None
    return Pruning(hydra_cfg.sweeper.storage, cfg.tracking.study, cfg.tracking.trial, pruner)


class EndedElsewhere:
    """For run.run_epochs, after each epoch: why the study has ended trial `number` while
    it trained (the failure_reason the sweep gave its run), None while it holds it as
    running."""

    def __init__(self, url: str | None, name: str, number: int) -> None:
        self.url, self.name, self.number = url, name, number

    def __call__(self) -> str | None:
        try:
            trial = study.held(self.url, self.name, self.number)
        except Exception:  # the study out of reach a moment: asked again after the next epoch
            return None
        if trial is None or trial.state == TrialState.RUNNING:
            return None  # a study in another process's memory: only that one ends it
        if schedule.cut_off(trial):
            return schedule.run_reason(trial.user_attrs.get(schedule.CUT_OFF))
        return f"interrupted: the study holds trial {self.number} as {trial.state.name}"


def ended_elsewhere(cfg: DictConfig, hydra_cfg: DictConfig) -> EndedElsewhere | None:
    """A trial's question to its study; None (no question) for a single run and for a
    job that is no trial of ours."""
    from hydra.types import RunMode

    if hydra_cfg.mode != RunMode.MULTIRUN or cfg.tracking.get("trial") is None:
        return None
    url = hydra_cfg.sweeper.get("storage")
    return EndedElsewhere(url, cfg.tracking.study, cfg.tracking.trial)


class PrunedAt(optuna.TrialPruned):
    """report's stop: the trial was pruned after `step`."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step

    def __str__(self) -> str:
        return f"trial pruned after step {self.step}"


def report(value: float, step: int) -> None:
    """The reporting call for any Hydra app that hydra/sweeper=study runs
    (docs/any-app.md): tells the trial's study its value after `step` (an epoch, from
    1), and raises optuna.TrialPruned (PrunedAt) when the study's pruner stops the
    trial; the sweep records it as pruned. Outside such a sweep (a single run, another
    sweeper, a study in memory) it does nothing."""
    from fashion_sweep.sweeps.apps import CONFIRMS

    link = _link()
    if link is None or link.multi or os.environ.get(CONFIRMS):
        return  # Optuna cannot prune several objectives; a confirmation run runs in full
    if link(step, float(value)):
        raise PrunedAt(step)


def current_trial() -> optuna.Trial | None:
    """The job's own Optuna trial, for an app that uses Optuna's trial API
    (trial.report, trial.should_prune, raise optuna.TrialPruned) as it would inside
    study.optimize; None outside a sweep of ours whose study is in a database."""
    link = _link()
    return link.trial if link is not None else None


def _link() -> Pruning | None:
    """This job's link to its trial's study, from its place (apps.STUDY, apps.TRIAL)."""
    from hydra.core.hydra_config import HydraConfig

    from fashion_sweep.sweeps.apps import STUDY, TRIAL

    name, number = os.environ.get(STUDY), os.environ.get(TRIAL)
    if name is None or number is None or not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if hydra.sweeper.get("storage") is None:
        return None
    # a relative sqlite:/// path is the sweep's, whose folder a job may have left
    # (hydra.job.chdir=true)
    storage = in_folder(str(hydra.sweeper.storage), hydra.runtime.cwd)
    pruner = hydra.sweeper.get("pruner") or OmegaConf.create({"_target_": NO_PRUNER})
    return Pruning(storage, name, int(number), pruner)


def in_folder(url: str, folder: str) -> str:
    """A database URL as seen from `folder`: a relative SQLite path made absolute."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url[len(prefix) :].startswith("/"):
        return prefix + os.path.join(folder, url[len(prefix) :])
    return url


def forget() -> None:
    _STUDIES.clear()
    RoundReads.made.clear()
