"""torch's CPU threads, shared among the processes that train on this machine.

torch starts with a thread per core. Two runs that each take every core slow each other
down by more than their share: two 2-epoch runs on 20,000 images, started together on
this 2-core machine, took 10.1 s each with 2 threads and 6.1 s with 1 (4.7 s alone).
So a process that trains on the CPU holds a place in a folder of this machine's
(`<tmp>/fashion_sweep-<uid>/training/<pid>-<start>`) while it trains, and with
trainer.share_cores=true, before each epoch takes its share of the cores: cores // the
places whose processes live (at least one thread). It is off by default because the
threads change torch's rounding (a run's numbers would depend on what else trains
here); a process that takes no share says once, where others train beside it, how to
take one. A place whose process is gone (killed) is not counted, and is removed.
Where the threads were set from outside (OMP_NUM_THREADS, as joblib sets it in its
workers or a user may; submitit's cpus_per_task: `set_by_launcher`), a process keeps
its own and counts for the others.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import torch

_fixed: str | None = None  # who set this process's threads, where not its share


def folder() -> Path:
    return Path(tempfile.gettempdir(), f"fashion_sweep-{os.getuid()}", "training")


def set_by_launcher(threads: int, by: str) -> None:
    """This process's threads, as its launcher gave it cores (`by` says which)."""
    global _fixed
    torch.set_num_threads(threads)
    _fixed = by


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class Share:
    """This process's place among the machine's training processes (`with`), and its
    share of the cores (`fit`) where it takes one."""

    def __init__(self, take: bool) -> None:
        started = int(psutil.Process().create_time() * 100)
        self.place = folder() / f"{os.getpid()}-{started}"
        self.take, self.hinted = take, False

    def __enter__(self) -> Share:
        self.place.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.place.touch()
        return self

    def __exit__(self, *_: object) -> None:
        self.place.unlink(missing_ok=True)

    def fit(self) -> str | None:
        """Takes this process's share of the cores; what to say, if anything: the
        threads it changed to, or once, where it takes no share and others train here,
        how to take one."""
        training, fixed = live(), "OMP_NUM_THREADS" in os.environ or _fixed is not None
        if fixed or training < 2 and not self.take:
            return None
        if not self.take:
            if self.hinted:
                return None
            self.hinted = True
            return (
                f"{training - 1} other process(es) train on this machine's {cores()} cores, "
                f"each with torch's thread per core: trainer.share_cores=true shares them "
                f"(docs/performance.md, Workers)"
            )
        share = max(1, cores() // max(1, training))
        if share == torch.get_num_threads():
            return None
        torch.set_num_threads(share)
        them = f"{training} processes train" if training > 1 else "it alone trains"
        return f"torch threads: {share} of {cores()} cores ({them} here)"


def live() -> int:
    """How many processes train on this machine now; the places of dead ones removed."""
    count = 0
    for place in folder().glob("*-*"):
        pid, _, started = place.name.partition("-")
        try:
            alive = int(psutil.Process(int(pid)).create_time() * 100) == int(started)
        except (psutil.Error, ValueError):
            alive = False
        if alive:
            count += 1
        else:
            with contextlib.suppress(OSError):
                place.unlink()
    return count


@contextlib.contextmanager
def shared(on_cpu: bool, take: bool) -> Iterator[Share | None]:
    """A place for a process training on the CPU (taking its share of the cores, or
    not); none for one on a GPU."""
    if not on_cpu:
        yield None
        return
    with Share(take) as share:
        yield share
