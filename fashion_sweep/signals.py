"""SIGTERM and SIGHUP end a run the way Ctrl-C does.

Python turns SIGINT into KeyboardInterrupt, so the `except`/`finally` blocks that
end MLflow runs KILLED and cut off a sweep's trials run. SIGTERM (`timeout`, `docker
stop`, systemd, SLURM preemption) and SIGHUP (a closed terminal) would end the
process at once and leave its runs RUNNING. Inside `interrupts()` they raise
`Terminated`, a KeyboardInterrupt, so the same clean-up runs; a SIGTERM or SIGHUP
during the clean-up is ignored, so it finishes (another Ctrl-C or SIGKILL still ends
it). The entry point then
ends the process by the same signal, so its parent sees the conventional status
(143 for SIGTERM, 129 for SIGHUP, 130 for SIGINT).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

TERMINATING = (signal.SIGTERM, signal.SIGHUP)
HANDLED = (signal.SIGINT, *TERMINATING)
_stopping = False  # a signal was turned into an exception; its clean-up is running


class Terminated(KeyboardInterrupt):
    """The process was asked to end by `signum`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def __reduce__(self) -> tuple:  # from a launcher's worker process to the sweep's
        return (Terminated, (self.signum,))


def reason(error: BaseException) -> str:
    """The failure_reason of a run or trial that `error` interrupted."""
    if isinstance(error, Terminated):
        return f"interrupted: {signal.Signals(error.signum).name}"
    return "interrupted"


def _raise(signum: int, _frame: object) -> None:
    global _stopping
    if signum == signal.SIGINT:
        _stopping = True
        raise KeyboardInterrupt  # as Python's own handler: a second Ctrl-C still stops
    if _stopping:
        return  # the first signal's clean-up is running: let it finish
    _stopping = True
    raise Terminated(signum)


@contextmanager
def interrupts() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Terminated inside the block, SIGINT KeyboardInterrupt (in
    the main thread; a no-op elsewhere, and where the block is already active). A
    signal the process was started to ignore (`nohup`: SIGHUP) stays ignored."""
    global _stopping
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {signum: signal.getsignal(signum) for signum in HANDLED}
    if any(handler is _raise for handler in before.values()):
        yield  # nested: the outer block restores
        return
    for signum, handler in before.items():
        if handler != signal.SIG_IGN:
            signal.signal(signum, _raise)
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        _stopping = False  # a worker process may run the next job


def exit_like(error: KeyboardInterrupt) -> None:
    """Ends the process as the signal behind `error` ends it by default."""
    signum = error.signum if isinstance(error, Terminated) else signal.SIGINT
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed terminal (SIGHUP)
            stream.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # not reached where the signal ends the process
