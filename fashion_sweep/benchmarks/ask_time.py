"""What asking the study for a trial costs as trials pile up (`bench --asks`).

For 4, 64 and 256 trials running (beside 20 complete, so TPE models them), in a fresh
SQLite study: milliseconds per ask in rounds of 1 (a slot refilled) and of 8. Before:
each ask and its sampler read back every trial not finished, and the loop read them
again to check the trial. Now (sweeps/snapshot.py): the round's asks use the read of the
study the loop makes once a round anyway (timed apart: it fails stale trials and counts
what is done), and at its end read what other workers asked meanwhile.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

from fashion_sweep.sweeps import study
from fashion_sweep.sweeps.sampler import PerTrialSeed

SPACE = {
    "optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1, log=True),
    "data.batch_size": optuna.distributions.CategoricalDistribution([32, 64, 128, 256]),
}
RUNNING = (4, 64, 256)


def ask_costs(asks: int = 16) -> list[dict[str, Any]]:
    """Per number of trials running: ms per ask before and now, in rounds of 1 and 8,
    and ms per read of the study (the loop's, once a round, either way)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for running in RUNNING:
            row: dict[str, Any] = {"running": running}
            for size in (1, 8):
                for way, ask in (("before", _before), ("now", _now)):
                    held, where = _study(Path(folder, f"{running}-{size}-{way}.db"), running)
                    asking = (
                        *study.for_asking(held, where),
                        where.get_study_id_from_name(held.study_name),
                    )  # once, as the loop does
                    spent = 0.0
                    for _ in range(asks // size):
                        trials = held.get_trials(deepcopy=False)  # the loop's read
                        started = time.perf_counter()
                        ask(held, asking, trials, size)
                        spent += time.perf_counter() - started
                    row[f"{way}, rounds of {size}"] = 1000 * spent / asks
            started = time.perf_counter()
            for _ in range(asks):
                held.get_trials(deepcopy=False)
            row["the loop's read"] = 1000 * (time.perf_counter() - started) / asks
            rows.append(row)
    return rows


def _study(path: Path, running: int) -> tuple[optuna.Study, Any]:
    where = optuna.storages.get_storage(f"sqlite:///{path}")  # as the sweep opens it
    sampler = PerTrialSeed(optuna.samplers.TPESampler, 0)
    held = optuna.create_study(storage=where, sampler=sampler, direction="maximize")
    for n in range(20):
        held.tell(held.ask(SPACE), n / 20)
    for _ in range(running):
        held.ask(SPACE)
    return held, where


def _before(held: optuna.Study, asking: Any, trials: list, size: int) -> None:
    """A round as the loop asked before snapshot.py: each ask, then a read of the study
    to check the trial."""
    for _ in range(size):
        held.ask(SPACE)
        held.get_trials(deepcopy=False)


def _now(held: optuna.Study, asking: Any, trials: list, size: int) -> None:
    asking, snapshot, study_id = asking
    with snapshot.one_read(trials):
        for _ in range(size):
            asking.ask(SPACE)
            asking.get_trials(deepcopy=False)
        snapshot.caught_up(study_id, SPACE)
