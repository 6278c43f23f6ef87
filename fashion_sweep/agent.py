"""A single run's MLflow work, in a process of its own beside the run.

`python -m fashion_sweep.train` (a single run) starts it first thing, so MLflow's
imports and the opening of its store (3 s on a 2-core machine) overlap torch's
instead of following them. The run sends it the calls of fashion_sweep/tracking.py
(`use_experiment`, `start_run`, `log_epoch`, `log_artifact`, `end_run`, ...); it
carries them out in order and answers each. The per-epoch calls (`log_epoch`,
`mark_pruned`) are not waited for: their answers, and any error in them, are collected
at the run's next call.

It runs in a session of its own and ignores the signals that end a run: the run ends
its MLflow run itself (KILLED) and then closes the socket. When the socket closes with
the MLflow run still open (the run was killed with -9), the agent ends it FAILED,
`failure_reason` "crashed", and exits.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

# Single runs only: a sweep's trials share one process, which pays MLflow's import once;
# and not for Hydra's flags that print and exit.
NOT_A_RUN = {"-m", "--multirun", "--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i"}
NOT_A_RUN |= {"--shell-completion", "-sc"}
CRASHED = "crashed: the run's process ended without ending its MLflow run"
ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # fashion_sweep/signals.py
_HEADER = struct.Struct("!Q")
_started: Agent | None = None


class AgentError(RuntimeError):
    """The MLflow process ended, or answered with an error of MLflow's own."""


class _Channel:
    """Length-prefixed pickles over one end of a socketpair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, bytearray()

    def send(self, message: Any) -> None:
        data = pickle.dumps(message)
        self.sock.sendall(_HEADER.pack(len(data)) + data)

    def next(self) -> Any | None:
        """The next whole message already received, if there is one."""
        if len(self.buffer) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(self.buffer)
        if len(self.buffer) < _HEADER.size + size:
            return None
        message = bytes(self.buffer[_HEADER.size : _HEADER.size + size])
        del self.buffer[: _HEADER.size + size]
        return pickle.loads(message)

    def fill(self) -> bool:
        """Reads what has arrived into the buffer; False at the end of the stream (a
        reset connection included: the other end left unread messages behind)."""
        try:
            chunk = self.sock.recv(1 << 16)
        except OSError:
            return False
        self.buffer += chunk
        return bool(chunk)


@contextlib.contextmanager
def _held_signals() -> Iterator[None]:
    """The signals that end a run wait until the block is done, so an interruption never
    falls between a message and its count."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, ENDING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Agent:
    """The run's end of the MLflow process: the calls of fashion_sweep/tracking.py that a
    run makes (fashion_sweep/train.py), carried out there."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fashion_sweep.agent", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # the terminal's signals are the run's to handle
        )
        theirs.close()
        self.channel, self.pending, self.run_open = _Channel(ours), 0, False

    def use_experiment(self, uri: str, experiment: str) -> str:
        return self._call("use_experiment", uri, experiment)

    def start_run(self, resolved: dict, tags: dict[str, str], overrides: list[str]) -> str:
        self.run_open = True
        return self._call("start_run", resolved, tags, overrides)

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        self._call("log_epoch", metrics, epoch, wait=False)

    def mark_pruned(self, epoch: int) -> None:
        self._call("mark_pruned", epoch, wait=False)

    def log_artifact(self, path: str) -> None:
        self._call("log_artifact", path)

    def sync(self) -> None:
        """The answers still owed: an error in an earlier call is raised here."""
        self._collect(block=True)

    def end_run(self, status: str, reason: str | None = None) -> None:
        self._call("end_run", status, reason)
        self.run_open = False

    def end_active_run(self, status: str, reason: str) -> None:
        self._call("end_active_run", status, reason)
        self.run_open = False

    def close(self, timeout: float = 30) -> None:
        """Ends the MLflow process: at once if it has nothing left to do, else once it
        has done what it was sent (at most `timeout` s)."""
        if not self.pending and not self.run_open:
            self.proc.kill()  # it may still be importing MLflow: nothing to wait for
        self.channel.sock.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _call(self, name: str, *args: Any, wait: bool = True) -> Any:
        with _held_signals():
            # the folder a relative sqlite:/// URI names: this process's (hydra.job.chdir)
            with contextlib.suppress(OSError):  # the process is gone: the answer says so
                self.channel.send((os.getcwd(), name, args))
            self.pending += 1
        if wait:
            return self._collect(block=True)
        self._collect(block=False)  # an error in an earlier call stops the run here
        return None

    def _collect(self, block: bool) -> Any:
        """The answers owed (those already here, unless `block`): the last value, or
        the first error once the answers after it are in too."""
        first, value = None, None
        while self.pending:
            with _held_signals():
                answer = self.channel.next()
                if answer is not None:
                    self.pending -= 1
            if answer is None:
                if not self._arrived(block or first is not None):
                    break
                continue
            ok, value = answer
            if not ok and first is None:
                first = _error(*value)
        if first is not None:
            raise first
        return value

    def _arrived(self, block: bool) -> bool:
        """Waits (if `block`) for more of the answers; False if none is here."""
        # note: select() is interrupted by Ctrl-C; reading and counting are not
        if not select.select([self.channel.sock], [], [], None if block else 0)[0]:
            return False
        with _held_signals():
            if self.channel.fill():
                return True
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.pending = 0
        raise AgentError(f"the MLflow process ended (exit status {code}); see above")


def _error(kind: str, message: str, line: str) -> BaseException:
    """An error the MLflow process met, as the run would have met it in its own process:
    ours as they are, MLflow's as one line (`Type: its first line`, passwords masked)."""
    from fashion_sweep.config import ConfigError
    from fashion_sweep.stores import StoreError

    known = {"StoreError": StoreError, "ConfigError": ConfigError, "LookupError": LookupError}
    return known[kind](message) if kind in known else AgentError(line)


def start(argv: list[str]) -> None:
    """Starts the MLflow process for a single run (not for -m)."""
    global _started
    flags = {arg.split("=", 1)[0] for arg in argv}
    if not NOT_A_RUN & flags and os.environ.get("FASHION_SWEEP_AGENT", "1") != "0":
        _started = Agent()


def take() -> Agent | None:
    """The MLflow process started for this run, once."""
    global _started
    agent, _started = _started, None
    return agent


def serve(fd: int) -> None:
    """The MLflow process: imports MLflow (what the run would wait for), then carries
    out calls until the run's end of the socket closes."""
    for signum in ENDING:  # the run ends its MLflow run itself, then closes the socket
        signal.signal(signum, signal.SIG_IGN)
    channel = _Channel(socket.socket(fileno=fd))
    from fashion_sweep import tracking
    from fashion_sweep.redaction import one_line

    tracking.preload()
    answering = True
    try:
        while True:
            message = channel.next()
            if message is None:
                if channel.fill():
                    continue
                break
            cwd, name, args = message
            try:
                if cwd != os.getcwd():
                    os.chdir(cwd)
                answer = (True, getattr(tracking, name)(*args))
            except Exception as error:
                answer = (False, (type(error).__name__, str(error), one_line(error)))
            if answering:
                try:
                    channel.send(answer)
                except OSError:  # the run is gone: what it sent is still carried out
                    answering = False
    finally:
        # note: before MLflow's own atexit hook, which would end the run FINISHED
        tracking.end_active_run("FAILED", CRASHED)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
    # note: what it was sent is done and committed; the interpreter's teardown and
    # MLflow's exit hooks would add seconds to the run's own exit, which waits for this
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
