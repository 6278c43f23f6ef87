"""The sweep's console: one line per trial this worker ran, as it ends, counted in the
study (so two workers on one study count alike), e.g.

    [7/12] trial 7  lr=0.0676 bs=64  val/accuracy 0.716  8.9 s | best 0.722 (trial 3) | ETA 45 s

A thread beside the loop reads the study every POLL_SECONDS, whatever the launcher
(the basic one trains in this process, the others elsewhere): the lines come as
trials end, not as a launcher's batch returns. The trials' own output is in their
trial folders (trial_output.py)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from datetime import datetime
from typing import Any, TextIO

from optuna.trial import FrozenTrial, TrialState

from fashion_sweep.sweeps import schedule

POLL_SECONDS = 1.0
# the launchers' loggers, whose INFO lines echo each job's overrides (the harness's own
# tracking.* keys among them): quiet while trials' lines are said here
LAUNCHERS = (
    "hydra._internal.core_plugins.basic_launcher",
    "hydra_plugins.hydra_joblib_launcher._core",
    "hydra_plugins.hydra_joblib_launcher.joblib_launcher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher",
    "fashion_sweep.launchers.packed",
)


class QuietLaunchers(logging.Filter):
    """Lets a launcher's warnings and errors through, not its per-job echo."""

    def __init__(self) -> None:
        super().__init__()
        self.loggers = [logging.getLogger(name) for name in LAUNCHERS]
        for logger in self.loggers:
            logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING

    def close(self) -> None:
        for logger in self.loggers:
            logger.removeFilter(self)


def short_names(keys: list[str]) -> dict[str, str]:
    """What a searched key is called in a line: its last part, initials where it has
    words (`data.batch_size` -> `bs`); the whole key where two would read alike."""
    shown = {}
    for key in keys:
        leaf = key.lstrip("+~").rsplit(".", 1)[-1]
        shown[key] = "".join(w[0] for w in leaf.split("_") if w) if "_" in leaf else leaf
    if len(set(shown.values())) < len(shown):
        return {key: key for key in keys}
    return shown


def value(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def label(number: int, params: dict[str, Any]) -> str:
    """A trial as runs and lines name it: `trial 7 lr=0.0676 bs=64`."""
    names = short_names(list(params))
    return " ".join([f"trial {number}", *(f"{names[k]}={value(v)}" for k, v in params.items())])


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    return f"{minutes // 60} h {minutes % 60} min"


def outcome(trial: FrozenTrial, metrics: list[str]) -> str:
    metric = metrics[0]
    if trial.state == TrialState.COMPLETE:
        return ", ".join(f"{m} {v:.4g}" for m, v in zip(metrics, trial.values, strict=True))
    if trial.state == TrialState.PRUNED:
        epoch = trial.user_attrs.get(schedule.PRUNED, trial.last_step)
        last = trial.intermediate_values.get(trial.last_step) if trial.last_step else None
        at = f" ({metric} {last:.4g})" if last is not None else ""
        return f"pruned after epoch {epoch}{at}"
    return f"failed: {trial.user_attrs.get(schedule.FAILURE, 'unknown')}"


def best_before(trials: list[FrozenTrial], end: datetime, maximize: bool) -> FrozenTrial | None:
    done = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and not schedule.confirming(t)
        and t.datetime_complete
        and t.datetime_complete <= end
    ]
    # the best value, the earlier trial among equals
    return max(done, key=lambda t: (t.value if maximize else -t.value, -t.number)) if done else None


def line(
    trial: FrozenTrial,
    trials: list[FrozenTrial],
    n_trials: int,
    metrics: list[str],
    maximize: bool,
    opened_at: datetime,
    confirmations: int = 0,
) -> str:
    """The line for `trial`, which has ended, as the study stood when it ended; a
    confirmation trial's counted among the stage's `confirmations` runs."""
    if schedule.confirming(trial):  # the search's count, best and ETA are not its
        seed, confirms = trial.user_attrs.get("seed"), trial.user_attrs[schedule.CONFIRMS]
        end = trial.datetime_complete or datetime.now()
        done = sum(
            _ended(t) and schedule.confirming(t) and (t.datetime_complete or end) <= end
            for t in trials
        )
        parts = [
            f"[confirm {done}/{confirmations}] {label(trial.number, trial.params)} seed={seed}",
            f"(confirms trial {confirms})",
            outcome(trial, metrics),
        ]
        if trial.datetime_start and trial.datetime_complete:
            parts.append(duration((trial.datetime_complete - trial.datetime_start).total_seconds()))
        return "  ".join(parts)
    end = trial.datetime_complete or datetime.now()
    counted = [t for t in trials if schedule.counts(t) and t.datetime_complete]
    done = sum(t.datetime_complete <= end for t in counted)
    parts = [f"[{done}/{n_trials}] {label(trial.number, trial.params)}", outcome(trial, metrics)]
    if trial.datetime_start:
        parts.append(duration((end - trial.datetime_start).total_seconds()))
    text = "  ".join(parts)
    best = best_before(trials, end, maximize) if len(metrics) == 1 else None  # a front, not one
    if best is not None:
        text += f" | best {best.value:.4g} (trial {best.number})"
    since = sum(opened_at <= t.datetime_complete <= end for t in counted)
    elapsed = (end - opened_at).total_seconds()
    if done < n_trials and since and elapsed > 0:
        text += f" | ETA {duration((n_trials - done) * elapsed / since)}"
    return text


def _ended(trial: FrozenTrial) -> bool:
    """A trial to say: counted, or a confirmation trial that ended on its own."""
    finished = trial.state.is_finished() and not schedule.cut_off(trial)
    return schedule.counts(trial) or (schedule.confirming(trial) and finished)


class Progress:
    """Says each of this worker's trials as it ends, from a thread (start/stop), and
    once more at the end (`say`)."""

    def __init__(
        self,
        study: Any,
        n_trials: int,
        metrics: list[str],
        maximize: bool,
        out: TextIO | None = None,
        confirmations: int = 0,
    ) -> None:
        self.study, self.n_trials, self.metrics, self.maximize = study, n_trials, metrics, maximize
        self.confirmations = confirmations  # runs of the confirmation stage: top_k x seeds
        self.out = out or sys.stdout  # the console, before a trial sends its output elsewhere
        self.opened_at = datetime.now()
        self.mine: set[int] = set()  # trial numbers this worker launched
        self.said: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="sweep-progress", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()
        self.say()

    def add(self, number: int) -> None:
        with self.lock:
            self.mine.add(number)

    def say(self) -> None:
        """Prints the lines of this worker's trials that ended since the last call."""
        with self.lock:
            waiting = self.mine - self.said
            if not waiting:
                return
            trials = self.study.get_trials(deepcopy=False)
            ended = [t for t in trials if t.number in waiting and _ended(t)]
            ended.sort(key=lambda t: (t.datetime_complete or datetime.max, t.number))
            for trial in ended:
                self.said.add(trial.number)
                text = line(
                    trial,
                    trials,
                    self.n_trials,
                    self.metrics,
                    self.maximize,
                    self.opened_at,
                    self.confirmations,
                )
                print(text, file=self.out, flush=True)

    def _watch(self) -> None:
        while not self.stopped.wait(POLL_SECONDS):
            try:
                self.say()
            except Exception:  # a store out of reach for a moment: the next poll says it
                time.sleep(POLL_SECONDS)
