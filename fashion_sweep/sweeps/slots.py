"""Slots, not batches: how the loop hands trials to a Hydra launcher.

Hydra's `Launcher.launch(jobs)` returns when the last of its jobs has ended, so a batch
is as slow as its slowest trial (upstream declined a non-blocking launcher: hydra #2257,
#3091). Two ways to launch, one interface (`start`, `wait`, `busy`, `stop`):

- `Pool`, for launchers whose jobs run in processes of their own (joblib's loky or
  multiprocessing workers, submitit's tasks, local or SLURM): each trial is launched
  alone, `launch([its job])`, from a thread of its own, so `hydra.sweeper.n_jobs` is
  the number of trials in flight and a slot is filled as soon as its trial ends. Only
  Hydra's public launcher API is called; the launcher's own settings (the joblib
  pool's size, submitit's resources) hold as they do for a batch.
- `Stream`, for a launcher with our own small interface, `launch_stream(jobs, more)`
  (the packed launcher, hydra.launcher.continuous): it trains in this process and calls
  `more` back as trials end, with their jobs' returns; the loop takes them back and
  answers with the next trials, so a pack stays full while the study has trials to ask.
- `Batches`, for every other launcher: the ones that run jobs in this process (basic,
  packed with continuous=false: one process trains one thing at a time, or one pack)
  and launchers this module does not know; a batch of up to n_jobs trials, waited for
  whole, as before.

`stop` ends what a pool still runs when the sweep is interrupted: the processes its
launcher started for this worker (workers.launched) are killed, as joblib kills its
workers when a batch is interrupted, and each launch is given a moment to return; the
loop marks their trials cut off.

A launch that raises because the process running its trial died (`died`: killed, out of
memory) fails that slot's trial alone: the loop cuts it off, to run again, and goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher

from fashion_sweep.sweeps import workers

log = logging.getLogger(__name__)

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.BaseSubmititLauncher"
PROCESS_BACKENDS = (None, "loky", "multiprocessing")  # joblib's; "threading" runs here
STOP_SECONDS = 10.0  # what an interrupted sweep waits for its launches to return
# what a launcher raises when the process running a job died: joblib's loky and
# multiprocessing pools, submitit's jobs
DEATHS = {"TerminatedWorkerError", "BrokenProcessPool", "UncompletedJobError", "FailedJobError"}


@dataclass
class Job:
    trial: Any  # the optuna.Trial it runs
    overrides: Sequence[str]
    idx: int  # hydra.job.num


@dataclass
class Ended:
    job: Job
    returned: JobReturn | None  # None if the launcher raised
    error: BaseException | None = None


def pooled(launcher: Launcher) -> bool:
    """Whether `launcher` runs each job in a process of its own (a pool's slots)."""
    names = {f"{kind.__module__}.{kind.__qualname__}" for kind in type(launcher).__mro__}
    if SUBMITIT in names:
        return True
    if JOBLIB in names:
        from joblib import effective_n_jobs

        options = dict(getattr(launcher, "joblib", None) or {})
        backend = options.get("backend")
        return (
            backend in PROCESS_BACKENDS
            and options.get("prefer") != "threads"
            and options.get("require") != "sharedmem"
            # loky runs n_jobs=1 in the calling thread (Hydra keeps multiprocessing's in
            # a pool of its own)
            and (backend == "multiprocessing" or effective_n_jobs(options.get("n_jobs")) > 1)
        )
    return False


def died(error: BaseException) -> bool:
    """Whether a launch raised `error` because the process running its job died."""
    return any(kind.__name__ in DEATHS for kind in type(error).__mro__)


# more(the jobs that ended, whether to ask) -> the next jobs: the loop's side of a Stream
More = Callable[[list[Ended], bool], list[Job]]


def for_launcher(launcher: Launcher, more: More) -> Batches | Pool | Stream:
    if pooled(launcher):
        return Pool(launcher)
    if hasattr(launcher, "launch_stream") and getattr(launcher, "continuous", False):
        return Stream(launcher, more)
    return Batches(launcher)


class Stream:
    """Jobs handed to the launcher as it asks for them (launch_stream): `start` returns
    when the launcher has no more to train; what ended meanwhile went to `more`."""

    def __init__(self, launcher: Any, more: More) -> None:
        self.launcher, self.more = launcher, more
        self.jobs: dict[int, Job] = {}  # by hydra.job.num: handed to the launcher, not back
        self.returned: list[Ended] = []

    @property
    def busy(self) -> int:  # in the launcher, or back and not yet taken by wait
        return len(self.jobs) + len(self.returned)

    def start(self, jobs: list[Job]) -> None:
        left = self.launcher.launch_stream(self._hand(jobs), self._more)
        self.returned += self._back(left)

    def _more(self, returned: list[tuple[int, JobReturn]], ask: bool) -> list[tuple[Any, int]]:
        return self._hand(self.more(self._back(returned), ask))

    def _hand(self, jobs: list[Job]) -> list[tuple[Sequence[str], int]]:
        self.jobs |= {job.idx: job for job in jobs}
        return [(job.overrides, job.idx) for job in jobs]

    def _back(self, returned: list[tuple[int, JobReturn]]) -> list[Ended]:
        return [Ended(self.jobs.pop(idx), job) for idx, job in returned]

    def wait(self, timeout: float) -> list[Ended]:
        ended, self.returned = self.returned, []
        return ended

    def stop(self) -> None:
        self.returned, self.jobs = [], {}


class Batches:
    """A batch launched whole; its jobs come back together."""

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        self.returned: list[Ended] = []

    @property
    def busy(self) -> int:
        return len(self.returned)

    def start(self, jobs: list[Job]) -> None:
        returns = self.launcher.launch([j.overrides for j in jobs], initial_job_idx=jobs[0].idx)
        self.returned += [Ended(job, r) for job, r in zip(jobs, returns, strict=True)]

    def wait(self, timeout: float) -> list[Ended]:
        ended, self.returned = self.returned, []
        return ended

    def stop(self) -> None:
        self.returned = []


class Pool:
    """Each job launched alone, from a thread of its own; each comes back as it ends."""

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        self.ended: queue.SimpleQueue[Ended] = queue.SimpleQueue()
        self.busy = 0  # started, not yet handed back by wait
        self.threads: list[threading.Thread] = []

    def start(self, jobs: list[Job]) -> None:
        for job in jobs:
            # a daemon: an interrupted sweep exits without waiting for a launch to return
            thread = threading.Thread(
                target=self._launch, args=(job,), name=f"trial-{job.trial.number}", daemon=True
            )
            thread.start()
            self.threads.append(thread)
            self.busy += 1

    def _launch(self, job: Job) -> None:
        try:
            (returned,) = self.launcher.launch([job.overrides], initial_job_idx=job.idx)
            self.ended.put(Ended(job, returned))
        except BaseException as error:  # a worker killed under it, a cluster refusing
            self.ended.put(Ended(job, None, error))

    def wait(self, timeout: float) -> list[Ended]:
        """The jobs that have ended: at least one, unless `timeout` s pass first."""
        try:
            ended = [self.ended.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                ended.append(self.ended.get_nowait())
            except queue.Empty:
                break
        self.busy -= len(ended)
        self.threads = [thread for thread in self.threads if thread.is_alive()]
        return ended

    def stop(self) -> None:
        if not self.busy:
            return
        running = workers.launched()
        workers.stop_launched(running)  # their trials' runs: the loop ends them KILLED
        log.info(f"Stopped {len(running)} process(es) still running trials of this sweep")
        deadline = time.monotonic() + STOP_SECONDS
        for thread in self.threads:  # joblib's launches end on the killed workers
            thread.join(max(0.0, deadline - time.monotonic()))
