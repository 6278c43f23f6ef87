"""A single run's MLflow work, in a process of its own beside the run.

`python -m fashion_sweep.train` (a single run) starts it first thing, so MLflow's
imports and the opening of its store (3 s on a 2-core machine) overlap torch's
instead of following them. The run sends it the calls of fashion_sweep/tracking.py
by name (`use_experiment`, `start_run`, `log_epoch`, `log_artifact`, `end_run`, ...);
it answers each in order. Calls whose answer the run does not need (`ASYNC`: the
per-epoch metrics) are not waited for: their answers, and any error in them, are
collected at the run's next call.

It runs in a session of its own, so the terminal's Ctrl-C reaches only the run, which
ends its MLflow run itself (KILLED). When the run's process ends without ending its
MLflow run (kill -9), the agent ends it FAILED, `failure_reason` "crashed", and exits.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import socket
import struct
import subprocess
import sys
from typing import Any

# What the run does not wait for: their answers come with the next call waited for.
# (use_experiment is waited for: a store that is not there is refused before the data.)
ASYNC = {"log_epoch", "mark_pruned"}
# Single runs only: a sweep's trials share one process, which pays MLflow's import once;
# and not for Hydra's flags that print and exit.
NOT_A_RUN = {"-m", "--multirun", "--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i"}
NOT_A_RUN |= {"--shell-completion", "-sc"}
CRASHED = "crashed: the run's process ended without ending its MLflow run"
_HEADER = struct.Struct("!Q")
_started: Agent | None = None


class AgentError(RuntimeError):
    """The MLflow process ended, or answered with an error of MLflow's own."""


class Agent:
    """The run's end of the MLflow process: `agent.name(*args)` calls
    fashion_sweep.tracking.name(*args) there."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fashion_sweep.agent", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # the terminal's signals are the run's to handle
        )
        theirs.close()
        self.sock, self.pending, self.buffer = ours, 0, bytearray()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.call(name, *args, **kwargs)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self._collect(block=False)  # an error in an earlier call stops the run here
        with contextlib.suppress(OSError):  # the process is gone: wait() says so
            _send(self.sock, (name, args, kwargs))
        self.pending += 1
        return None if name in ASYNC else self.wait()

    def wait(self) -> Any:
        """Every answer still owed, in order: the last one's value, or the first error."""
        return self._collect(block=True)

    def close(self, timeout: float = 30) -> None:
        """Ends the MLflow process once it has done what it was sent."""
        self.sock.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _collect(self, block: bool) -> Any:
        """The answers owed (those already here, unless `block`): the last value, or
        the first error once the answers that follow it are in too."""
        first, value = None, None
        while self.pending:
            answer = self._answer(block or first is not None)
            if answer is None:
                break
            ok, value = answer
            self.pending -= 1
            if not ok and first is None:
                first = value
        if first is not None:
            raise first
        return value

    def _answer(self, block: bool) -> tuple[bool, Any] | None:
        while True:
            if len(self.buffer) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(self.buffer)
                if len(self.buffer) >= _HEADER.size + size:
                    message = bytes(self.buffer[_HEADER.size : _HEADER.size + size])
                    del self.buffer[: _HEADER.size + size]
                    ok, value = pickle.loads(message)
                    return ok, value if ok else _error(*value)
            if not block and not select.select([self.sock], [], [], 0)[0]:
                return None
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                try:
                    code = self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    code = self.proc.wait()
                raise AgentError(f"the MLflow process ended (exit status {code}); see above")
            self.buffer += chunk


def _error(kind: str, message: str, line: str) -> BaseException:
    """An error the MLflow process met, as the run would have met it in its own process:
    ours as they are, MLflow's as one line (`Type: its first line`, passwords masked)."""
    from fashion_sweep.config import ConfigError
    from fashion_sweep.stores import StoreError

    known = {"StoreError": StoreError, "ConfigError": ConfigError, "LookupError": LookupError}
    return known[kind](message) if kind in known else AgentError(line)


def _send(sock: socket.socket, message: Any) -> None:
    data = pickle.dumps(message)
    sock.sendall(_HEADER.pack(len(data)) + data)


def _receive(sock: socket.socket) -> Any:
    """The next message, or None at EOF."""
    header = _exactly(sock, _HEADER.size)
    return None if header is None else pickle.loads(_exactly(sock, _HEADER.unpack(header)[0]))


def _exactly(sock: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def start(argv: list[str]) -> None:
    """Starts the MLflow process for a single run (not for -m)."""
    global _started
    if not NOT_A_RUN & set(argv) and os.environ.get("FASHION_SWEEP_AGENT", "1") != "0":
        _started = Agent()


def take() -> Agent | None:
    """The MLflow process started for this run, once."""
    global _started
    agent, _started = _started, None
    return agent


def serve(fd: int) -> None:
    """The MLflow process: imports MLflow (what the run would wait for), then carries
    out calls until the run's end of the socket closes."""
    sock = socket.socket(fileno=fd)
    from fashion_sweep import tracking
    from fashion_sweep.redaction import one_line

    tracking.preload()

    ended = True
    try:
        while (message := _receive(sock)) is not None:
            name, args, kwargs = message
            try:
                answer = (True, getattr(tracking, name)(*args, **kwargs))
            except Exception as error:
                answer = (False, (type(error).__name__, str(error), one_line(error)))
            ended = {"start_run": False, "end_run": True}.get(name, ended)
            _send(sock, answer)
    except OSError:  # the run is gone (a reset connection: it left answers unread)
        pass
    finally:
        # note: before MLflow's own atexit hook, which would end the run FINISHED
        if not ended:
            tracking.end_active_run("FAILED", CRASHED)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
    # note: what it was sent is done and committed; the interpreter's teardown and
    # MLflow's exit hooks would add seconds to the run's own exit, which waits for this
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
