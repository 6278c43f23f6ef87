"""A single run's MLflow work, in a process of its own beside the run.

`python -m fashion_sweep.train` (a single run) starts it first thing, so MLflow's
imports and the opening of its store (3 s on a 2-core machine) overlap torch's
instead of following them. The run sends it the calls of the Tracker interface
(tracker.py: `use_experiment`, `open_run`, `log_metrics`, `end_run`, ...), which it
carries out in order with runs.py and answers each. The per-epoch calls (`log_metrics`,
`mark_pruned`) are not waited for: their answers, and any error in them, are collected
at the run's next call. The model file is written by the run's own process (it holds
the weights) and sent as a path.

It runs in a session of its own and ignores the signals that end a run: the run ends
its MLflow run itself (KILLED) and then closes the socket. When the socket closes with
a run still open (the run was killed with -9), the side process ends it FAILED,
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
import tempfile
from collections.abc import Iterator
from typing import Any

from fashion_sweep import signals

# Single runs only: a sweep's trials share one process, which pays MLflow's import once;
# and not for Hydra's flags that print and exit.
NOT_A_RUN = {"-m", "--multirun", "--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i"}
NOT_A_RUN |= {"--shell-completion", "-sc"}
CRASHED = "crashed: the run's process ended without ending its MLflow run"
ENDING = signals.HANDLED
_HEADER = struct.Struct("!Q")
_started: SideProcess | None = None


class AgentError(RuntimeError):
    """The MLflow process ended, or answered with an error of MLflow's own. (Its name is
    in the failure_reason of the runs it failed, so it stays.)"""


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


class SideProcess:
    """The run's end of the MLflow process: a Tracker (tracker.py) whose calls are
    carried out there. A run handle is the run's id."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fashion_sweep.tracking.side_process", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # the terminal's signals are the run's to handle
        )
        theirs.close()
        self.channel, self.pending, self.sent = _Channel(ours), 0, 0  # sent: answered or not
        self.uri: str | None = None

    def use_experiment(self, uri: str, experiment: str) -> str:
        self.uri = uri
        return self._call("use_experiment", uri, experiment)

    def open_run(self, resolved: dict, tags: dict[str, str], overrides: list[str]) -> str:
        try:
            return self._call("open_run", resolved, tags, overrides)
        except KeyboardInterrupt as stop:  # the run may be open there, its id not here yet
            self._send("end_open_runs", "KILLED", signals.reason(stop))  # nothing collected
            raise

    def log_metrics(self, run: str, metrics: dict[str, float], epoch: int) -> None:
        self._call("log_metrics", run, metrics, epoch, wait=False)

    def mark_pruned(self, run: str, epoch: int) -> None:
        self._call("mark_pruned", run, epoch, wait=False)

    def log_model(self, run: str, state_dict: dict[str, Any]) -> None:
        import torch  # the run's process holds the weights, and torch

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.pth")
            torch.save(state_dict, path)
            self._call("log_artifact", run, path)

    def end_run(self, run: str, status: str, reason: str | None = None) -> None:
        """Ended there, or from this process if the MLflow process is gone."""
        try:
            self._call("end_run", run, status, reason)
        except AgentError:
            from fashion_sweep.tracking.runs import end_run

            end_run(run, status, reason, if_running=True, uri=self.uri)

    def run_id(self, run: str) -> str:
        return run

    def error(self, run: str) -> None:
        return None  # every error is raised: by its call, or at the next one

    def sync(self) -> None:
        """The answers still owed: an error in an earlier call is raised here."""
        self._collect(block=True)

    def flush(self, abandon: bool = False) -> None:
        pass  # every call is answered before the run ends (close)

    def close(self, timeout: float = 30) -> None:
        """Ends the MLflow process: at once if it was sent nothing (it may still be
        importing MLflow), else once it has done what it was sent and seen the socket
        close, which it does at once when it is idle (at most `timeout` s). It is never
        killed while it may still be writing: the run's records end in the store."""
        if not self.sent:
            self.proc.kill()
        self.channel.sock.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _call(self, name: str, *args: Any, wait: bool = True) -> Any:
        self._send(name, *args)
        if wait:
            return self._collect(block=True)
        self._collect(block=False)  # an error in an earlier call stops the run here
        return None

    def _send(self, name: str, *args: Any) -> None:
        with _held_signals():
            # the folder a relative sqlite:/// URI names: this process's (hydra.job.chdir)
            with contextlib.suppress(OSError):  # the process is gone: the answer says so
                self.channel.send((os.getcwd(), name, args))
            self.pending += 1
            self.sent += 1

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
    from fashion_sweep.tracking.stores import StoreError

    known = {"StoreError": StoreError, "ConfigError": ConfigError, "LookupError": LookupError}
    return known[kind](message) if kind in known else AgentError(line)


def start(argv: list[str]) -> None:
    """Starts the MLflow process for a single run (not for -m)."""
    global _started
    flags = {arg.split("=", 1)[0] for arg in argv}
    if not NOT_A_RUN & flags and os.environ.get("FASHION_SWEEP_AGENT", "1") != "0":
        _started = SideProcess()


def take() -> SideProcess | None:
    """The MLflow process started for this run, once."""
    global _started
    agent, _started = _started, None
    return agent


class _Server:
    """What the MLflow process carries out: runs.InProcess's calls, keeping count of
    the runs it opened and has not ended."""

    def __init__(self) -> None:
        from fashion_sweep.tracking import runs

        self.runs, self.tracker, self.open_runs = runs, runs.InProcess(), []

    def call(self, name: str, args: tuple) -> Any:
        if name == "end_open_runs":
            return self.end_open_runs(*args)
        answer = getattr(self.tracker, name)(*args)
        if name == "open_run":
            self.open_runs.append(answer)
        elif name == "end_run" and args[0] in self.open_runs:
            self.open_runs.remove(args[0])
        return answer

    def end_open_runs(self, status: str, reason: str) -> None:
        """Ends the runs still open, each unless it has ended already (from the run's own
        process, when this one did not answer)."""
        while self.open_runs:
            self.runs.end_run(self.open_runs.pop(), status, reason, if_running=True)


def serve(fd: int) -> None:
    """The MLflow process: imports MLflow (what the run would wait for), then carries
    out calls until the run's end of the socket closes."""
    for signum in ENDING:  # the run ends its MLflow run itself, then closes the socket
        signal.signal(signum, signal.SIG_IGN)
    channel = _Channel(socket.socket(fileno=fd))
    from fashion_sweep.tracking import runs
    from fashion_sweep.tracking.redaction import one_line

    runs.preload()
    server = _Server()
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
                answer = (True, server.call(name, args))
            except Exception as error:
                answer = (False, (type(error).__name__, str(error), one_line(error)))
            if answering:
                try:
                    channel.send(answer)
                except OSError:  # the run is gone: what it sent is still carried out
                    answering = False
    finally:
        server.end_open_runs("FAILED", CRASHED)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
    # note: what it was sent is done and committed; the interpreter's teardown and
    # MLflow's exit hooks would add seconds to the run's own exit, which waits for this
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
