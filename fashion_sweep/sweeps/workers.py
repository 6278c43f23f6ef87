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

A trial run in a process of its own (joblib's workers, submitit's tasks) knows the
sweep worker that launched it (`handed_down`, through the environment the launcher's
processes inherit) and watches it (`watched`): once that worker is provably gone, the
trial is interrupted, its MLflow run ended KILLED (DEAD_WORKER), and the process exits,
idle or not, rather than train on for a sweep that is no longer there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

from fashion_sweep import signals

log = logging.getLogger(__name__)
DEAD_WORKER = "interrupted: its sweep worker died"  # failure_reason of a crashed trial's run
ENV = "FASHION_SWEEP_WORKER"  # the sweep worker that launched this process's jobs (JSON)
WATCH_SECONDS = 1.0  # how often a trial's process looks whether its sweep worker lives
CLEAN_UP_SECONDS = 30.0  # what an interrupted trial may take to end its run before exit
# loky's resource tracker, started with joblib's pool, lists as it exits the locks and
# folders a killed pool left, and removes them: a note for loky's developers, not users
QUIET_TRACKER = "ignore:resource_tracker:UserWarning"


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
    """When process `pid` started (clock ticks since boot), None if there is none (or
    it has ended and waits to be reaped: a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # from field 3 on, after the command name
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22


@contextlib.contextmanager
def handed_down() -> Iterator[None]:
    """Names this process, while the block runs, as the sweep worker of the jobs it
    launches: the processes a launcher starts inherit it in their environment."""
    before = {key: os.environ.get(key) for key in (ENV, "PYTHONWARNINGS")}
    os.environ[ENV] = json.dumps(me())
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [before["PYTHONWARNINGS"], QUIET_TRACKER]))
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def launched() -> list[Any]:
    """The processes a launcher started for this sweep worker's jobs (psutil's): they
    carry its name in their environment (joblib's workers, submitit's local tasks). Not
    loky's resource tracker, which frees what the others leave behind."""
    import psutil

    mine, found = me()["id"], []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error, ValueError):
            worker = json.loads(child.environ().get(ENV, "null"))
            ours = isinstance(worker, dict) and worker.get("id") == mine
            if ours and not any("resource_tracker" in part for part in child.cmdline()):
                found.append(child)
    return found


def stop_launched(processes: list[Any], wait: float = 5.0) -> None:
    """Kills those of `processes` (launched's) still running; waits up to `wait` s."""
    import psutil

    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(processes, timeout=wait)


def fit_threads(launcher_options: Any) -> None:
    """A trial's process uses the cores its launcher gave it: torch's threads to
    submitit's cpus_per_task (on a cluster or not), unless OMP_NUM_THREADS is set (joblib
    sets it in its workers to cores // n_jobs; a user may set it). Processes that each
    take every core slow one another down (docs/performance.md, Workers)."""
    cpus = launcher_options.get("cpus_per_task") if launcher_options else None
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        from fashion_sweep import threads

        threads.set_by_launcher(int(cpus), "hydra.launcher.cpus_per_task")


def launcher() -> dict[str, Any] | None:
    """The sweep worker that launched this process's job, if it is another process
    whose life this process can judge; else None."""
    try:
        worker = json.loads(os.environ.get(ENV, "null"))
    except ValueError:
        return None
    if not isinstance(worker, dict) or worker.get("id") == me()["id"]:
        return None  # no sweep's, or a job in the sweep's own process (basic, packed)
    return worker if alive(worker) is not None else None


class _Watch:
    """The daemon thread of a trial's process that watches its sweep worker."""

    def __init__(self, worker: dict[str, Any]) -> None:
        self.worker = worker
        self.lock = threading.Lock()
        self.busy = False  # a job runs in the main thread
        self.idle = threading.Event()  # set when none does
        threading.Thread(target=self._run, name="sweep-watch", daemon=True).start()

    def _run(self) -> None:
        while alive(self.worker) is not False:
            time.sleep(WATCH_SECONDS)
        log.warning(f"The sweep worker {name(self.worker)} is gone: this process stops")
        with self.lock:
            busy = self.busy
        if busy:  # its run ends KILLED, as the sweep's resume ends it
            signals.stop(DEAD_WORKER)
            self.idle.wait(CLEAN_UP_SECONDS)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(128 + signal.SIGTERM)  # nothing is left to return a result to


_WATCH: _Watch | None = None


@contextlib.contextmanager
def watched() -> Iterator[None]:
    """A job's block, in a process a launcher started: if the sweep worker that launched
    it dies, the block is interrupted (signals.stop, DEAD_WORKER) and the process exits
    once the block has ended; between blocks, it exits at once. Inside
    signals.interrupts(). Elsewhere (the sweep's own process, a sweep worker this
    process cannot judge) the block just runs."""
    global _WATCH
    worker = launcher()
    if worker is None:
        yield
        return
    signals.quiet()  # its sweep's process says what a Ctrl-C does
    if _WATCH is None:  # one thread for the process's life, idle time included
        _WATCH = _Watch(worker)
    watch = _WATCH
    with watch.lock:
        watch.worker = worker  # the same for every job of a launcher's process
        watch.busy = True
        watch.idle.clear()
    try:
        yield
    finally:
        with watch.lock:
            watch.busy = False
            watch.idle.set()


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
