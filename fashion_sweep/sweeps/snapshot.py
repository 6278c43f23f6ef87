"""One read of the study for a round of asks, whatever the number of trials running.

Optuna's `Study.ask` and its sampler each read back every trial the study has not
finished, from the database, for every ask: three reads an ask with TPE, so that asking
for one trial took 21 ms with 4 trials running and 82 ms with 256 (SQLite, this 2-core
machine), and a worker asking for 64 trials read the study 192 times. `Snapshot` is the
study's storage as the worker's asking study sees it: during `one_read(trials)`, every
read of the study's trials is served from the trials the loop has just read, kept up to
date with this worker's own writes (the trials it creates, their parameters and
attributes, read back by id, one query per trial changed). Writes go to the database as
before. The trials other workers created meanwhile are read at the round's end, by
number (`caught_up`), so that the loop checks the round against them (loop.Sweep._ask);
a change to a trial the round had read is seen at the next round. Outside a round,
reads pass through. A trial the round makes, or takes from the queue, is named its
worker's at once (user attr `worker`), before the sampler draws its values.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Collection, Container, Iterator, Sequence
from typing import Any

from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState


class Snapshot(BaseStorage):
    """`inner` (the study's storage), whose trials are read once per round of asks."""

    def __init__(self, inner: BaseStorage, worker: dict[str, Any] | None = None) -> None:
        self.inner, self.worker = inner, worker
        self._held: dict[int, FrozenTrial] | None = None  # the round's trials, by number
        self._changed: set[int] = set()  # trial ids written since they were read
        self.taken: list[int] = []  # the ids of the trials the last round created or took

    @contextlib.contextmanager
    def one_read(self, trials: Sequence[FrozenTrial]) -> Iterator[None]:
        """Reads of the study's trials come from `trials` (all of them, just read)."""
        self._held, self._changed, self.taken = {t.number: t for t in trials}, set(), []
        try:
            yield
        finally:
            self._held = None

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        if self._held is None:
            return self.inner.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        for trial_id in self._changed:
            trial = self.inner.get_trial(trial_id)
            self._held[trial.number] = trial
        self._changed.clear()
        held = sorted(self._held.values(), key=lambda t: t.number)
        trials = [t for t in held if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def caught_up(self, study_id: int, names: Collection[str]) -> list[FrozenTrial]:
        """The round's trials with those other workers created meanwhile, read by number
        (a query for each, and one to find there is none after), and those it held
        while their parameters (`names`) were still being drawn or were queued, read
        again: as many reads as trials were created or half-drawn, not as trials are
        running."""
        assert self._held is not None, "only within one_read"
        self.get_all_trials(study_id, deepcopy=False)  # this worker's writes, read back
        for trial in list(self._held.values()):
            drawing = trial.state == TrialState.RUNNING and not set(names) <= set(trial.params)
            if drawing or trial.state == TrialState.WAITING:
                found = self.inner.get_trial_id_from_study_id_trial_number(study_id, trial.number)
                self._held[trial.number] = self.inner.get_trial(found)
        last = max(self._held, default=-1)
        missing = [n for n in range(last) if n not in self._held]  # in a race only
        for number in itertools.chain(missing, itertools.count(last + 1)):
            try:
                trial_id = self.inner.get_trial_id_from_study_id_trial_number(study_id, number)
            except KeyError:  # the last trial so far
                if number > last:
                    break
                continue
            self._held[number] = self.inner.get_trial(trial_id)
        return sorted(self._held.values(), key=lambda t: t.number)

    def _wrote(self, trial_id: int) -> None:
        if self._held is not None:
            self._changed.add(trial_id)

    def _write(self, write: Callable[..., Any], trial_id: int, *args: Any) -> Any:
        """`write(trial_id, *args)`, the trial read back at the round's next read whether
        or not it took (a queued trial another worker took first is read as it is now)."""
        try:
            return write(trial_id, *args)
        finally:
            self._wrote(trial_id)

    # The trials' writes: to the database, and noted for the round's reads.

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        trial_id = self.inner.create_new_trial(study_id, template_trial)
        self._wrote(trial_id)
        if template_trial is None or template_trial.state != TrialState.WAITING:
            self.taken.append(trial_id)  # a queued one is whoever takes it's (below)
            self._name(trial_id)
        return trial_id

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: Any
    ) -> None:
        self._write(
            self.inner.set_trial_param, trial_id, param_name, param_value_internal, distribution
        )

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        took = self._write(self.inner.set_trial_state_values, trial_id, state, values)
        if took and state == TrialState.RUNNING:  # a queued trial, taken by this worker
            self.taken.append(trial_id)
            self._name(trial_id)
        return took

    def _name(self, trial_id: int) -> None:
        """The trial's worker, from the moment it is this worker's: a worker killed while
        the sampler draws its values leaves a trial a resume knows to be a dead one's."""
        if self.worker is not None:
            self.inner.set_trial_user_attr(trial_id, "worker", self.worker)

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        self._write(self.inner.set_trial_intermediate_value, trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._write(self.inner.set_trial_user_attr, trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._write(self.inner.set_trial_system_attr, trial_id, key, value)

    # The rest as the study's storage has it.

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self.inner.get_trial(trial_id)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self.inner.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def create_new_study(
        self, directions: Sequence[StudyDirection], study_name: str | None = None
    ) -> int:
        return self.inner.create_new_study(directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self.inner.delete_study(study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self.inner.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self.inner.set_study_system_attr(study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self.inner.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self.inner.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self.inner.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self.inner.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self.inner.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[Any]:
        return self.inner.get_all_studies()
