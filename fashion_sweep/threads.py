"""torch's CPU threads, shared among the processes that train on this machine.

torch starts with a thread per core. Two runs that each take every core slow each other
down by more than their share: two 2-epoch runs on 20,000 images, started together on
this 2-core machine, took 10.1 s each with 2 threads and 6.1 s with 1 (4.7 s alone).
So a process that trains on the CPU holds a place in a folder of this user's on this
machine (`<tmp>/fashion_sweep-<uid>/training/<pid>-<start>`) while it trains, and with
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
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import torch

_fixed: str | None = None  # who set this process's threads, where not its share
_DEFAULT = torch.get_num_threads()  # torch's own count: a thread per physical core
CLOCK = 100  # hundredths of a second: a process's start, as psutil reads it (with slack)


def folder() -> Path:
    """This user's places (per temp folder: a job's own TMPDIR keeps it apart)."""
    return Path(tempfile.gettempdir(), f"fashion_sweep-{os.getuid()}", "training")


def set_by_launcher(threads: int, by: str) -> None:
    """This process's threads, as its launcher gave it cores (`by` says which)."""
    global _fixed
    torch.set_num_threads(threads)
    _fixed = by


def cores() -> int:
    """The cores torch would use alone: its thread count when this process started."""
    return _DEFAULT


def _started(pid: int) -> int:
    return round(psutil.Process(pid).create_time() * CLOCK)


class Share:
    """This process's place among the machine's training processes (`with`), and its
    share of the cores (`fit`) where it takes one. Where no place can be kept (a temp
    folder that is not writable, or not this user's), the process trains as it would
    alone and says so once."""

    def __init__(self, take: bool) -> None:
        self.place = folder() / f"{os.getpid()}-{_started(os.getpid())}"
        self.take, self.hinted, self.held = take, False, False

    def __enter__(self) -> Share:
        self.held = _hold(self.place)
        return self

    def __exit__(self, *_: object) -> None:
        if self.held:
            self.place.unlink(missing_ok=True)

    def fit(self) -> str | None:
        """Takes this process's share of the cores; what to say, if anything: the
        threads it changed to, or once, where it takes no share and others train here,
        how to take one (or that no place could be kept)."""
        if not self.held:
            if self.take and not self.hinted:
                self.hinted = True
                return f"trainer.share_cores: no place in {folder()}: torch keeps its threads"
            return None
        if not self.place.exists():  # removed by someone who judged it dead: back
            _hold(self.place)
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


def _hold(place: Path) -> bool:
    """Makes `place` in folders of this user's own (not a link, not another's); False
    where it cannot."""
    try:
        for path in (place.parent.parent, place.parent):
            path.mkdir(mode=0o700, exist_ok=True)
            found = path.lstat()
            if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid():
                return False
        flags = os.O_CREAT | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0)
        os.close(os.open(place, flags, 0o600))
    except OSError:
        return False
    return True


def live() -> int:
    """How many processes train on this machine now; the places of dead ones removed."""
    count = 0
    for place in folder().glob("*-*"):
        pid, _, started = place.name.partition("-")
        try:  # the start read again may differ by a clock step: a second's slack
            alive = abs(_started(int(pid)) - int(started)) <= CLOCK
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
