"""One worker's run of a sweep: ask the study for trials, launch them, until it is done.

`Sweep.run` opens the sweep (opening.py), then loops: fail the trials whose workers are
gone and queue their configurations again, stop when too many trials failed, ask for as
many trials as there are free slots (never a configuration the study holds), start
them, take back the ones that ended, and wait for other workers' trials when nothing is
left to ask. A slot is one of hydra.sweeper.n_jobs trials in flight: filled again as
soon as its trial ends where the launcher runs jobs in processes of their own, after the
whole batch otherwise (slots.py). Each job records its own outcome in the study as it
returns (callbacks.ReportToStudy); what the loop cuts off when it is interrupted is
marked so, and runs again on the next run. The decisions are schedule.py's; the end is
report.py's.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from datetime import datetime
from typing import Any

import optuna
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from fashion_sweep import signals
from fashion_sweep.sweeps import confirm, progress, report, schedule, slots, study, workers
from fashion_sweep.sweeps.compose import ComposeOnce
from fashion_sweep.sweeps.opening import open_sweep, release
from fashion_sweep.sweeps.settings import Settings, SweepFailed
from fashion_sweep.tracking import sweep_runs
from fashion_sweep.tracking.redaction import one_line

log = logging.getLogger(__name__)
POLL_SECONDS = 2.0  # how often a worker with nothing to run looks at the others' trials
SAY_EVERY = 30.0  # seconds between the lines saying what a waiting worker waits for


class Sweep:
    def __init__(
        self, settings: Settings, config: DictConfig, launcher: Launcher, compose: ComposeOnce
    ) -> None:
        self.settings, self.config, self.launcher, self.compose = (
            settings,
            config,
            launcher,
            compose,
        )
        self.pending: list[optuna.Trial] = []  # asked by this worker, not yet recorded
        self.job_idx = 0
        self.ids: dict[int, int] = {}  # trial number -> the storage's trial id
        self.died = 0  # trials whose process died under them, in this run
        self.said: tuple[Any, float] = ((), 0.0)  # what the last waiting line said, when
        self.slots = slots.for_launcher(launcher, self._refill)

    def run(self, arguments: list[str]) -> None:
        self.opened = open_sweep(
            self.settings, self.config, self.compose, arguments, self._on_stale
        )
        try:
            self._start()
        except BaseException as error:  # the folder not held, the parent not left RUNNING
            release(self.opened.sweep_dir)
            if self.opened.parent:
                sweep_runs.close_sweep_run(self.opened.parent, error)
            raise
        quiet = progress.QuietLaunchers() if self.to_file else None
        self.progress.start()
        try:
            with workers.handed_down():  # a trial in a process of its own watches this one
                self._loop()
            self.progress.stop()
            trials = self.opened.study.get_trials(deepcopy=False)
            if why := schedule.none_completed(trials):  # whatever max_failure_rate allows
                raise SweepFailed(why)
            report.finish(self.opened, self.config)
        except BaseException as error:
            self.progress.stop()
            self.slots.stop()  # no trial of this worker trains on
            why = signals.reason(error)  # Ctrl-C, SIGTERM, SIGHUP, or an error here
            for trial in list(self.pending):
                try:
                    self._settle(self.opened.study, trial, why)
                except Exception:  # MLflow out of reach: the study is what counts
                    study.cut_off(self.opened.study, trial, why)
            self._cut_off_unreturned(why)
            with contextlib.suppress(Exception):  # a trial recorded as its run ended
                self.progress.say()
            if self.opened.parent:
                sweep_runs.close_sweep_run(self.opened.parent, error)
            raise
        finally:
            self.beats.stop()
            release(self.opened.sweep_dir)
            if quiet is not None:
                quiet.close()

    def _start(self) -> None:
        """What the loop needs besides what opening.py opened."""
        # trial_output=file where the app writes each trial's output to its log (apps.py)
        self.to_file = self.settings.trials_to_file and self.opened.app.logs_trials
        self.asking, self.snapshot = study.for_asking(
            self.opened.study, self.opened.where, workers.me()
        )
        self.beats = workers.Heartbeats(self._beat, self.settings.heartbeat_interval)
        self.progress = progress.Progress(
            self.opened.study,
            self.opened.n_trials,
            self.opened.metrics,
            self.opened.maximize,
            confirmations=self.settings.top_k * self.settings.seeds,
        )
        if self.settings.top_k and self.opened.metric.startswith("test/"):
            log.warning(
                f"The confirmation stage picks its winner by {self.opened.metric}: on the "
                f"test set (sweep=optuna optimizes val/accuracy, a split held out)"
            )

    def _loop(self) -> None:
        while True:
            trials = self._reap()
            state = schedule.tally(trials)
            self._check_failures(state)
            wanted, asked = self._next(trials, state)
            if asked:
                self.slots.start(self._jobs(asked))
            running = state.running + [
                t for t in trials if schedule.confirming(t) and t.state == TrialState.RUNNING
            ]
            if self.slots.busy:
                self._ended(self.slots.wait(POLL_SECONDS))
            elif wanted:
                continue  # what was asked stepped aside: look again
            elif running:
                self._wait(running)
            else:
                return

    def _to_confirm(self, trials: list[FrozenTrial], state: schedule.Tally) -> list:
        """The confirmation trials to queue, once the search's trials are all done
        (confirm.missing), with one entry (None) for each queued one nobody runs yet."""
        settings = self.settings
        if not settings.top_k or state.running or len(state.counted) < self.opened.n_trials:
            return []
        key = self.opened.app.seed_key(settings.confirm)
        used = {self.opened.app.seed(key)} | {t.params[key] for t in trials if key in t.params}
        maximize = self.opened.maximize
        wanted = confirm.missing(
            trials, settings.top_k, settings.seeds, settings.seed, used, maximize, key
        )
        waiting = [t for t in trials if schedule.confirming(t) and t.state == TrialState.WAITING]
        return [*[None] * len(waiting), *wanted]

    def _check_failures(self, state: schedule.Tally) -> None:
        n_trials = self.opened.n_trials
        whole = f"the {n_trials} trials the search space holds" if self.opened.used_up else None
        rate = self.settings.max_failure_rate
        if why := schedule.too_many_failures(state, n_trials, rate, whole):
            raise SweepFailed(why)

    def _reap(self) -> list[FrozenTrial]:
        """Ends the running trials whose workers are gone, queues again what was cut off
        (as far as n_trials has room); the study's trials after that."""
        held = self.opened.study
        study.quiet(optuna.storages.fail_stale_trials, held)  # by heartbeat: _on_stale
        trials = held.get_trials(deepcopy=False)
        now, grace = datetime.now(), self.settings.grace_period
        stale = [
            t
            for t in trials
            if schedule.stale(t, workers.alive(t.user_attrs.get("worker")), now, grace)
        ]
        for trial in stale:
            found = study.trial(self.settings.storage, self.opened.name, trial.number)
            if found and self._settle(*found, "crashed"):
                log.warning(self._gone(trial))
        if stale:
            trials = held.get_trials(deepcopy=False)
        due = schedule.retries_due(trials, self.opened.space.searched, self.opened.n_trials)
        for trial in due:
            held.enqueue_trial(trial.params, user_attrs={schedule.RETRY_OF: trial.number})
            log.info(f"Trial {trial.number} was cut off: its configuration runs again")
        return held.get_trials(deepcopy=False) if due else trials

    def _cut_off_unreturned(self, why: str) -> None:
        """Cuts off a trial the last round created or took but whose ask never returned
        (the interruption came inside it), as the pending ones are: else a resume would
        find it RUNNING, and fail it as crashed only once this process has gone."""
        asked = {trial.number for trial in self.pending}
        for trial_id in self.snapshot.taken:
            found = self.opened.where.get_trial(trial_id)
            if found.state == TrialState.RUNNING and found.number not in asked:
                self.opened.where.set_trial_user_attr(trial_id, schedule.CUT_OFF, why)
                with contextlib.suppress(ValueError, UpdateFinishedTrialError):
                    study.tell(self.opened.study, found.number, state=TrialState.FAIL)

    def _settle(self, holder: optuna.Study, trial: optuna.Trial, why: str) -> bool:
        """Ends a trial that will run no further. A job that ended its MLflow run but was
        cut off before it recorded its outcome is recorded as its run ended; any other
        trial is cut off (user attr `interrupted`), its MLflow run KILLED. True if it was
        cut off here."""
        uri, parent = self.opened.app.tracking_uri, self.opened.parent
        run = sweep_runs.trial_run(uri, parent, trial.number) if parent else None
        ended = sweep_runs.ended_as(run, self.opened.metrics) if run else None
        if ended is not None:
            pruned = run.data.tags.get(schedule.PRUNED)
            study.record(holder, trial, ended, run.info.run_id, int(pruned) if pruned else None)
            return False
        if not study.cut_off(holder, trial, why):
            return False
        if run is not None:
            sweep_runs.kill_trial_run(uri, run, schedule.run_reason(why))
        return True

    def _on_stale(self, _: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's callback for a trial it failed because its heartbeat stopped."""
        log.warning(self._gone(trial))
        uri, parent = self.opened.app.tracking_uri, self.opened.parent
        if parent:
            run = sweep_runs.trial_run(uri, parent, trial.number)
            sweep_runs.kill_trial_run(uri, run, workers.DEAD_WORKER)

    def _gone(self, trial: FrozenTrial) -> str:
        worker = workers.name(trial.user_attrs.get("worker"))
        return f"Trial {trial.number} (worker {worker}) was cut off: marked failed"

    def _ask(
        self, wanted: int, trials: list[FrozenTrial], queue: list | None = None
    ) -> list[optuna.Trial]:
        """Up to `wanted` new trials, each with this worker's heartbeat and name, asked
        under one read of the study (`trials`, just read: snapshot.py), `queue`'s
        confirmation trials (confirm.Wanted) queued first; then, with the trials other
        workers asked meanwhile, a trial that overshoots n_trials or repeats a
        configuration another worker drew (a confirmation trial: one another worker
        queued) steps aside."""
        with self.snapshot.one_read(trials):
            for wanted_trial in queue or []:
                if wanted_trial is not None:
                    params = wanted_trial.confirms.params
                    self.asking.enqueue_trial(params, user_attrs=wanted_trial.user_attrs)
            asked = self._ask_round(wanted)
            trials = self.snapshot.caught_up(self.opened.study_id, self.opened.space.searched)
        kept = []
        for trial in asked:
            frozen = next(t for t in trials if t.number == trial.number)
            if schedule.confirming(frozen):
                if confirm.repeat(frozen, trials):
                    self._step_aside(trial, "duplicate")
                else:
                    kept.append(trial)
                    self.progress.add(trial.number)
            elif schedule.surplus(trial.number, trials, self.opened.n_trials):
                self._step_aside(trial, "surplus")
            elif schedule.duplicate(frozen, trials) and self._redraw(trials, trial.number):
                self._step_aside(trial, "duplicate")
            else:
                kept.append(trial)
                self.progress.add(trial.number)
        return kept

    def _ask_round(self, wanted: int) -> list[optuna.Trial]:
        asking, asked = self.asking, []
        for _ in range(wanted + 10):  # a few redraws for repeats, then what there is
            if len(asked) == wanted:
                break
            trial = study.quiet(asking.ask, self.opened.space.searched)
            self.pending.append(trial)  # named this worker's as it was made (snapshot.py)
            self.beats.add(self._trial_id(trial.number))
            if self.opened.extend is not None:
                self.opened.extend(self.config, trial)
            trials = asking.get_trials(deepcopy=False)  # the round's read, and its own
            frozen = next(t for t in trials if t.number == trial.number)
            if schedule.confirming(frozen):
                if confirm.repeat(frozen, trials):
                    self._step_aside(trial, "duplicate")
                    continue
                asked.append(trial)
                continue
            if schedule.surplus(trial.number, trials, self.opened.n_trials):
                self._step_aside(trial, "surplus")
                break
            if schedule.duplicate(frozen, trials) and self._redraw(trials, trial.number):
                self._step_aside(trial, "duplicate")
                continue
            asked.append(trial)
        return asked

    def _redraw(self, trials: list[FrozenTrial], number: int) -> bool:
        """Whether a repeated configuration is drawn again: always, where the space is
        infinite; in a finite one while points are left, one of which is queued."""
        if self.opened.points is None:
            return True
        left = schedule.unheld(self.opened.points, trials)
        if not left:
            return False  # the space has fewer points than n_trials: repeats must come
        pick = random.Random(schedule.trial_seed(self.settings.seed, number)).choice(left)
        self.asking.enqueue_trial(pick)  # in this round's read too, so its next ask takes it
        return True

    def _jobs(self, asked: list[optuna.Trial]) -> list[slots.Job]:
        jobs = [
            slots.Job(trial, self._overrides(trial), idx)
            for idx, trial in enumerate(asked, self.job_idx)
        ]
        self.job_idx += len(jobs)
        return jobs

    def _refill(self, ended: list[slots.Ended], ask: bool) -> list[slots.Job]:
        """A Stream's call back (slots.py), as its trials end: takes them back, and
        where `ask`, the next trials for the slots they left, as the loop asks them."""
        self._ended(ended)
        if not ask:
            return []
        trials = self._reap()
        state = schedule.tally(trials)
        self._check_failures(state)
        return self._jobs(self._next(trials, state)[1])

    def _next(
        self, trials: list[FrozenTrial], state: schedule.Tally
    ) -> tuple[int, list[optuna.Trial]]:
        """The next trials for the free slots: the search's, then once it is done, the
        confirmation stage's (confirm.py). How many were wanted, and those asked."""
        free = self.settings.n_jobs - self.slots.busy
        wanted = schedule.to_ask(state, self.opened.n_trials, free)
        queue = [] if wanted else self._to_confirm(trials, state)[:free]
        if not (wanted or queue):
            return 0, []
        return wanted or len(queue), self._ask(wanted or len(queue), trials, queue)

    def _ended(self, ended: list[slots.Ended]) -> None:
        """Takes back jobs that ended: records what a job could not record itself."""
        for done in ended:
            if done.error is not None and slots.died(done.error):
                self._died(done.job.trial, done.error)
                continue
            if done.error is not None:  # the launcher itself failed: as a batch's would
                raise done.error
            trial, job = done.job.trial, done.returned
            found = self.opened.where.get_trial(self._trial_id(trial.number))
            reason = found.user_attrs.get(schedule.FAILURE)
            if found.state == TrialState.RUNNING:  # its job could not record it
                reason = self._record(trial, job)
            if reason and not self.to_file:  # else progress.py says it
                log.warning(f"Trial {trial.number} failed: {reason}")
            self.beats.discard(self._trial_id(trial.number))
            self.pending.remove(trial)
            ended = self.opened.where.get_trial(self._trial_id(trial.number))
            self.opened.app.ended(ended, self.opened.metrics)

    def _died(self, trial: optuna.Trial, error: BaseException) -> None:
        """A trial whose process died under it (killed, out of memory): cut off, to run
        again, unless its job ended its run first; the sweep goes on, unless processes
        die for more trials than the sweep has."""
        self.died += 1
        if self._settle(self.opened.study, trial, schedule.DIED):
            log.warning(
                f"Trial {trial.number} was cut off: {schedule.DIED} "
                f"({type(error).__name__}); its configuration runs again"
            )
        self.beats.discard(self._trial_id(trial.number))
        self.pending.remove(trial)
        if self.died > self.opened.n_trials:
            raise SweepFailed(
                f"the processes of {self.died} trials died under them, more than "
                f"hydra.sweeper.n_trials={self.opened.n_trials}: {one_line(error)}"
            )

    def _record(self, trial: optuna.Trial, job: Any) -> str | None:
        """Records a job's outcome here (a study in this process's memory, a job whose
        process died); the reason it failed, if it did."""
        uri, parent = self.opened.app.tracking_uri, self.opened.parent
        ended = study.outcome_of(job, uri, parent, trial.number, self.to_file)
        if ended is None:
            return None
        outcome, run_id = ended
        study.record(self.opened.study, trial, outcome, run_id)
        recorded = self.opened.where.get_trial(self._trial_id(trial.number))
        return recorded.user_attrs.get(schedule.FAILURE)  # a value that is none, too

    def _overrides(self, trial: optuna.Trial) -> tuple[str, ...]:
        """A trial's overrides: its values, the fixed ones, and its place in MLflow; a
        confirmation trial's, its seed and the trial it confirms."""
        space, name = self.opened.space, self.opened.name
        values = {**trial.params, **space.fixed}
        fixed = space.fixed_overrides
        name_of = progress.label(trial.number, trial.params)
        attrs, confirms = trial.user_attrs, trial.user_attrs.get(schedule.CONFIRMS)
        if confirms is not None:
            key = self.opened.app.seed_key(self.settings.confirm)
            values[key] = attrs[confirm.SEED]
            fixed = [o for o in fixed if o.lstrip("+~").split("=")[0] != key]
            name_of += f" {key.rsplit('.', 1)[-1]}={attrs[confirm.SEED]} (confirms {confirms})"
        place = self.opened.app.overrides(name, trial, self.opened.parent, name_of, confirms)
        return (*(f"{key}={value}" for key, value in values.items()), *fixed, *place)

    def _step_aside(self, trial: optuna.Trial, why: str) -> None:
        """Cuts off a trial of this worker's that never ran (surplus, duplicate)."""
        study.cut_off(self.opened.study, trial, why)
        self.beats.discard(self._trial_id(trial.number))
        self.pending.remove(trial)

    def _wait(self, running: list[FrozenTrial]) -> None:
        """Waits for other workers' trials, saying which, and until when at most."""
        now = time.monotonic()
        numbers = tuple(t.number for t in running)
        if numbers != self.said[0] or now - self.said[1] > SAY_EVERY:
            whose = ", ".join(
                f"{t.number} ({workers.name(t.user_attrs.get('worker'))})" for t in running
            )
            log.info(
                f"Waiting for trials of other workers: {whose}; a trial whose worker "
                f"stops beating is failed after {self.settings.grace_period} s"
            )
            self.said = (numbers, now)
        time.sleep(POLL_SECONDS)

    def _trial_id(self, number: int) -> int:
        if number not in self.ids:
            self.ids[number] = self.opened.where.get_trial_id_from_study_id_trial_number(
                self.opened.study_id, number
            )
        return self.ids[number]

    def _beat(self, trial_id: int) -> None:
        if hasattr(self.opened.where, "record_heartbeat"):  # a database, not memory
            self.opened.where.record_heartbeat(trial_id)
