"""Who runs a trial, and whether it is still alive.

A sweep worker is named by a token made when it starts, never by host and pid alone:
pids repeat (a restarted container, a fresh PID namespace) and hostnames change. Its
trials carry it as the user attr `worker`. Whether a worker is alive is known two ways:

- anywhere, by Optuna's heartbeat: the worker records one per running trial every
  `heartbeat_interval` seconds, and a trial silent for `grace_period` seconds is
  failed by whoever looks (optuna.storages.fail_stale_trials);
- at once, where it can be proven: a worker on this kernel and in this PID namespace
  is gone when its pid is gone or now belongs to a process started at another time.

Anything else (another machine, another namespace, no /proc) waits for the heartbeat.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any


@cache
def me() -> dict[str, Any]:
    """This process as a sweep worker: the `worker` user attr of the trials it runs."""
    pid = os.getpid()
    return {
        "id": f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:12]}",
        "pid": pid,
        "kernel": _kernel(),
        "started": _start_time(pid),
    }


def name(worker: Any) -> str:
    """How a trial's `worker` attr is shown in the log."""
    return worker.get("id", "?") if isinstance(worker, dict) else "none yet"


def alive(worker: Any) -> bool | None:
    """True if `worker` (a trial's `worker` attr) is this process or provably running,
    False if provably gone, None if this process cannot tell (the heartbeat will)."""
    if not isinstance(worker, dict) or "pid" not in worker:
        return None
    if worker.get("id") == me()["id"]:
        return True
    if worker.get("kernel") is None or worker.get("kernel") != me()["kernel"]:
        return None  # another machine, boot or PID namespace: its pid means nothing here
    started = _start_time(int(worker["pid"]))
    return started is not None and started == worker.get("started")


def _kernel() -> str | None:
    """This boot of this machine and this PID namespace, or None where /proc cannot say."""
    try:
        if int(Path("/proc/self/stat").read_text().split()[0]) != os.getpid():
            return None  # a /proc of another PID namespace: its pids are not ours
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])  # field 22, after the command name


class Heartbeats:
    """One thread that records a heartbeat for each trial this worker runs, every
    `interval` seconds, through `beat(trial_id)` (RDBStorage.record_heartbeat).

    `add` beats once before it returns, so a trial has a sign of life as soon as it
    has a worker. The thread is a daemon: it never keeps a dying process alive.
    """

    def __init__(self, beat: Callable[[int], None], interval: float) -> None:
        self._beat, self._interval = beat, interval
        self._trials: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, trial_id: int) -> None:
        self._beat(trial_id)
        with self._lock:
            self._trials.add(trial_id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)
            self._thread.start()

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self._trials.discard(trial_id)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._interval + 5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                trials = list(self._trials)
            for trial_id in trials:
                # a busy database: the next beat is in `interval` s
                with contextlib.suppress(Exception):
                    self._beat(trial_id)
