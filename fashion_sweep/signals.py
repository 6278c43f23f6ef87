"""SIGTERM and SIGHUP end a run the way Ctrl-C does.

Python turns SIGINT into KeyboardInterrupt, so the `except`/`finally` blocks that
end MLflow runs KILLED and cut off a sweep's trials run. SIGTERM (`timeout`, `docker
stop`, systemd, SLURM preemption) and SIGHUP (a closed terminal) would end the
process at once and leave its runs RUNNING. Inside `interrupts()` they raise
`Terminated`, a KeyboardInterrupt, so the same clean-up runs. Any signal during the
clean-up is ignored, so it finishes, however often Ctrl-C is pressed: the third Ctrl-C
more quits at once, its runs left as they are (so does SIGKILL). The entry point then
ends the process by the same signal, so its parent sees the conventional status
(143 for SIGTERM, 129 for SIGHUP, 130 for SIGINT).

While the process starts (`hold()`, before `interrupts()`), a signal is noted and acted
on when `interrupts()` begins: a KeyboardInterrupt raised inside torch's import aborts
the process or prints a traceback.

`stop(why)` is SIGTERM sent from another thread of the process with a reason of its own
(a trial whose sweep worker died: sweeps/workers.py), which the runs it ends record.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

TERMINATING = (signal.SIGTERM, signal.SIGHUP)
HANDLED = (signal.SIGINT, *TERMINATING)
_stopping = False  # a signal was turned into an exception; its clean-up is running
_held: int | None = None  # a signal that came while starting (hold())
_pressed = 0  # Ctrl-C presses during a clean-up
QUIT_AFTER = 3  # more Ctrl-C presses during a clean-up that quit at once
_why: str | None = None  # what stop() was asked to say
_original: dict[int, Any] = {}  # the handlers hold() replaced
_speaks = True  # says the Ctrl-C notes (a launcher's worker does not: its sweep does)


class Terminated(KeyboardInterrupt):
    """The process was asked to end by `signum` (by stop(), `why`)."""

    def __init__(self, signum: int, why: str | None = None) -> None:
        super().__init__(why or signal.Signals(signum).name)
        self.signum, self.why = signum, why

    def __reduce__(self) -> tuple:  # from a launcher's worker process to the sweep's
        return (Terminated, (self.signum, self.why))


def reason(error: BaseException) -> str:
    """The failure_reason of a run or trial that `error` interrupted."""
    if isinstance(error, Terminated):
        return error.why or f"interrupted: {signal.Signals(error.signum).name}"
    return "interrupted"


def stop(why: str) -> None:
    """From any thread: the main thread is interrupted as SIGTERM interrupts it, and the
    runs it ends record `why` as their failure_reason. Outside `interrupts()` SIGTERM
    does what it does there (by default, ends the process)."""
    global _why
    _why = why
    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)


def _raise(signum: int, _frame: object) -> None:
    global _stopping, _pressed
    if _stopping:  # the first signal's clean-up is running: let it finish
        if signum == signal.SIGINT:
            _pressed += 1
            if _pressed == 1:
                _say(f"error: ending the runs first (Ctrl-C {QUIT_AFTER - 1} more times: quit now)")
            elif _pressed >= QUIT_AFTER:
                _say("error: quit before the runs were ended")
                os._exit(128 + signal.SIGINT)
        return
    _stopping = True
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum, _why if signum == signal.SIGTERM else None)  # stop()'s, or a signal


def _say(line: str) -> None:
    """One line to the terminal from a signal handler (os.write: a handler may run inside a
    print), unless this process is a launcher's worker (`quiet`), which gets the same
    Ctrl-C as the sweep that says it."""
    if _speaks:
        with contextlib.suppress(OSError):
            os.write(2, f"{line}\n".encode())


def quiet() -> None:
    """This process runs a sweep's jobs for another (sweeps/workers.py): the sweep's own
    process says the Ctrl-C notes."""
    global _speaks
    _speaks = False


def _hold(signum: int, _frame: object) -> None:
    global _held
    _held = _held or signum


def hold() -> None:
    """From now until `interrupts()`, Ctrl-C, SIGTERM and SIGHUP are noted, not raised;
    `interrupts()` raises the first of them as it begins. For a process's start-up
    (imports), where an exception from a signal handler would surface inside torch."""
    for signum in HANDLED:
        handler = signal.getsignal(signum)
        if handler != signal.SIG_IGN and handler is not _hold:
            _original[signum] = handler
            signal.signal(signum, _hold)


def _quit(signum: int, _frame: object) -> None:
    """Ctrl-C once the work is done (interpreter shutdown): quits, quietly."""
    os._exit(128 + signum)


@contextmanager
def interrupts() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Terminated inside the block, SIGINT KeyboardInterrupt (in
    the main thread; a no-op elsewhere, and where the block is already active). A
    signal the process was started to ignore (`nohup`: SIGHUP) stays ignored."""
    global _stopping, _held, _pressed, _why
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
        if _held is not None:  # a signal while the process started
            noted, _held = _held, None
            _raise(noted, None)
        yield
    finally:
        for signum, handler in before.items():
            if handler is _hold:  # the work is done: Ctrl-C quits, the others as before hold()
                handler = _quit if signum == signal.SIGINT else _original.get(signum, handler)
            signal.signal(signum, handler)
        _stopping = False  # a worker process may run the next job
        _pressed = 0
        _why = None


def exit_like(error: KeyboardInterrupt) -> None:
    """Ends the process as the signal behind `error` ends it by default."""
    signum = error.signum if isinstance(error, Terminated) else signal.SIGINT
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed terminal (SIGHUP)
            stream.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # not reached where the signal ends the process
