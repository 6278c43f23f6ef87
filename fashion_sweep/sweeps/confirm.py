"""The confirmation stage: a sweep's best configurations trained again with new seeds,
and the answer given with its spread.

With `hydra.sweeper.confirm.top_k=3 hydra.sweeper.confirm.seeds=5`
(conf/sweep/confirmed.yaml), once the search's n_trials are done, the top_k
configurations are each trained `seeds` more times, each time with a new seed. The top_k
are distinct configurations of COMPLETE search trials, best first by the optimized
metric, ties going to the earlier trial. Each run is a trial of the study with three
user attrs: `confirms` (the search trial), `repeat` (0 to seeds-1) and `seed` (its
trainer.seed). So these runs survive what the search survives, and raising top_k or
seeds extends the stage as n_trials extends the search.

Seeds come from the sampler's seed, the search trial and the repeat. No seed is used
twice, and none that the search used. The statistics leave out the search trial's own
value: it was picked for being high, so it would bias the mean upward. The winner is
the configuration whose confirmation runs have the best mean of the optimized metric
(validation, never test). Its model is the one of its runs with the best value of that
metric.

Pure functions of the study's trials (and, for the statistics, the MLflow runs'
metrics), as schedule.py's are.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from fashion_sweep.sweeps.progress import label
from fashion_sweep.sweeps.schedule import CONFIRMS, config, confirming, cut_off

REPEAT = "repeat"  # user attr: which of the configuration's confirmation runs (0, 1, ...)
SEED = "seed"  # user attr: its trainer.seed
REPORTED = ("test/accuracy", "test/loss")  # reported with their spread beside the metric


@dataclass(frozen=True)
class Wanted:
    """A confirmation trial the stage needs and the study does not hold."""

    confirms: FrozenTrial  # the search trial whose configuration it trains again
    repeat: int
    seed: int

    @property
    def user_attrs(self) -> dict[str, int]:
        return {CONFIRMS: self.confirms.number, REPEAT: self.repeat, SEED: self.seed}


def top(
    trials: list[FrozenTrial], k: int, maximize: bool, seed_key: str = "trainer.seed"
) -> list[FrozenTrial]:
    """The search's best k distinct configurations, best first (ties: the earlier); a
    searched seed (`seed_key`) makes no other configuration."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and not confirming(t)]
    complete.sort(key=lambda t: (-t.value if maximize else t.value, t.number))
    chosen, seen = [], set()
    for trial in complete:
        # a searched seed does not make another configuration: the stage replaces it
        key = tuple(item for item in config(trial) or () if item[0] != seed_key)
        if key not in seen:
            seen.add(key)
            chosen.append(trial)
    return chosen[:k]


def key(trial: FrozenTrial) -> tuple[int, int]:
    return trial.user_attrs[CONFIRMS], trial.user_attrs[REPEAT]


def held(trial: FrozenTrial) -> bool:
    """A confirmation trial that ran, runs, or is queued to run."""
    queued = trial.state in (TrialState.RUNNING, TrialState.WAITING)
    return confirming(trial) and (queued or (trial.state.is_finished() and not cut_off(trial)))


def missing(
    trials: list[FrozenTrial],
    k: int,
    seeds: int,
    seed: int | None,
    used: Iterable[int],
    maximize: bool,
    seed_key: str = "trainer.seed",
) -> list[Wanted]:
    """The confirmation trials the stage needs and no trial holds, in order. One that
    was cut off runs again with its seed; a new one gets a seed that neither the search
    (`used`: its trainer.seed values) nor another confirmation trial has."""
    confirmations = [t for t in trials if confirming(t)]
    have = {key(t) for t in confirmations if held(t)}
    before = {key(t): t.user_attrs[SEED] for t in confirmations}
    taken = {*used, *before.values()}
    wanted = []
    for trial in top(trials, k, maximize, seed_key):
        for repeat in range(seeds):
            if (trial.number, repeat) in have:
                continue
            given = before.get((trial.number, repeat))
            if given is None:
                given = _new_seed(seed, trial.number, repeat, taken)
            wanted.append(Wanted(trial, repeat, given))
    return wanted


def _new_seed(seed: int | None, number: int, repeat: int, taken: set[int]) -> int:
    """A trainer.seed for repeat `repeat` of trial `number`: the same in every worker
    for the same study, never one in `taken` (which it joins)."""
    for attempt in itertools.count():
        text = f"confirm:{seed}:{number}:{repeat}:{attempt}"
        value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") >> 1
        if value not in taken:
            taken.add(value)
            return value
    raise AssertionError("unreachable")


def repeat(trial: FrozenTrial, trials: list[FrozenTrial]) -> bool:
    """Another confirmation trial, asked before this one or finished, holds its key
    (two workers queued the same): this one steps aside."""
    return any(
        other.number != trial.number
        and (other.number < trial.number or other.state.is_finished())
        and held(other)
        and key(other) == key(trial)
        for other in trials
    )


@dataclass(frozen=True)
class Spread:
    """A sample's mean, standard deviation and 95% confidence interval of the mean
    (Student's t with n - 1 degrees of freedom; none for fewer than 2 values)."""

    n: int
    mean: float
    sd: float | None
    low: float | None
    high: float | None

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        n = len(values)
        mean = statistics.fmean(values)
        if n < 2:
            return cls(n, mean, None, None, None)
        from scipy.stats import t

        sd = statistics.stdev(values)
        half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        return cls(n, mean, sd, mean - half, mean + half)

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "sd": self.sd, "ci95": [self.low, self.high]}


def results(
    trials: list[FrozenTrial],
    k: int,
    seeds: int,
    metric: str,
    maximize: bool,
    metrics: dict[str, dict[str, float]],
    seed_key: str = "trainer.seed",
) -> dict[str, Any] | None:
    """What optimization_results.yaml says of the stage: each confirmed configuration
    with its spread (`metrics`: each confirmation run's MLflow metrics, by run id), best
    mean first (those with fewer than 2 completed runs, no interval, after the rest),
    those none of whose runs completed, and the winner; None before the stage ran."""
    confirmed, unconfirmed = [], []
    for rank, trial in enumerate(top(trials, k, maximize, seed_key), 1):
        mine = [
            t
            for t in trials
            if confirming(t)
            and t.user_attrs[CONFIRMS] == trial.number
            and t.user_attrs[REPEAT] < seeds  # a resume may ask for fewer
        ]
        runs = sorted(
            (t for t in mine if t.state == TrialState.COMPLETE),
            key=lambda t: t.user_attrs[REPEAT],
        )
        failed = sum(t.state.is_finished() and not cut_off(t) for t in mine) - len(runs)
        name = label(trial.number, trial.params)  # as the trial's run is named
        if not runs:
            if failed:
                unconfirmed.append({"trial": trial.number, "label": name, "failed": failed})
            continue
        ids = [t.user_attrs.get("mlflow_run_id") for t in runs]
        spread = {metric: Spread.of([t.value for t in runs]).as_dict()}
        for reported in REPORTED:
            values = [metrics.get(i, {}).get(reported) for i in ids]
            if reported != metric and all(v is not None for v in values):
                spread[reported] = Spread.of(values).as_dict()
        best = (max if maximize else min)(runs, key=lambda t: t.value)
        confirmed.append(
            {
                "trial": trial.number,
                "label": name,
                "params": dict(trial.params),
                "search_rank": rank,
                "search_value": trial.value,
                # the search's single run less the mean: > 0, its run was above the mean
                "search_minus_mean": trial.value - spread[metric]["mean"],
                "seeds": [t.user_attrs[SEED] for t in runs],
                "values": [t.value for t in runs],  # of the metric, seed by seed
                "trials": [t.number for t in runs],
                "failed": failed,
                **spread,
                "model_trial": best.number,
                "model_run_id": best.user_attrs.get("mlflow_run_id"),
                "model_seed": best.user_attrs[SEED],
            }
        )
    if not confirmed and not unconfirmed:
        return None
    sign = -1 if maximize else 1
    confirmed.sort(key=lambda c: (c[metric]["n"] < 2, sign * c[metric]["mean"]))
    return {
        "top_k": k,
        "seeds": seeds,
        "statistics": "over the confirmation runs alone (the search trial left out); "
        "95% confidence interval of the mean, Student's t",
        "configurations": confirmed,
        "unconfirmed": unconfirmed,  # none of their runs completed
        "winner": confirmed[0]["trial"] if confirmed else None,
        "search_best_kept_its_place": bool(confirmed) and confirmed[0]["search_rank"] == 1,
    }
