"""A pack's MLflow runs, written by one thread beside the training (launchers/packed.py).

Opening 64 runs and logging their epochs is seconds of writes, much of it waiting on a
disk or a tracking server; one thread makes them in order while the pack trains. The
Writer is a Tracker (tracker.py) whose run handles are futures of run ids. Each run's
writes are its own: the first one that fails marks the run broken, its later writes
are skipped, and its end is FAILED with that error, so a run never says FINISHED with
something missing. The caller asks error(run) and fails that trial alone.

The thread is a daemon: a write stuck on a store that does not answer never keeps the
process alive after a second interruption has given up on it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any

from fashion_sweep.tracking import runs
from fashion_sweep.tracking.redaction import one_line


class Writer:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: list[Future] = []
        self._errors: dict[int, BaseException] = {}  # id(a run's future) -> first error
        threading.Thread(target=self._serve, name="pack-mlflow", daemon=True).start()

    def use_experiment(self, uri: str, experiment: str) -> str:
        return runs.use_experiment(uri, experiment)  # at once: the pack waits for the store

    def open_run(self, resolved: dict, tags: dict[str, str], overrides: list[str]) -> Future:
        return self._submit(lambda: runs.open_run(resolved, tags, overrides))

    def write(self, run: Future, fn: Callable[..., Any], *args: Any) -> None:
        """fn(the run's id, *args), unless the run is broken."""

        def call() -> None:
            if self.error(run) is None:
                try:
                    fn(run.result(), *args)
                except BaseException as error:
                    self._errors.setdefault(id(run), error)
                    raise

        self._submit(call)

    def log_metrics(self, run: Future, metrics: dict[str, float], epoch: int) -> None:
        self.write(run, runs.log_metrics, metrics, epoch)

    def mark_pruned(self, run: Future, epoch: int) -> None:
        self.write(run, runs.mark_pruned, epoch)

    def log_model(self, run: Future, state_dict: dict[str, Any]) -> None:
        self.write(run, runs.log_model, state_dict)

    def end_run(self, run: Future, status: str, reason: str | None = None) -> None:
        """Ends the run: a broken run FINISHED is FAILED, with its first error."""

        def call() -> None:
            if run.cancelled() or run.exception() is not None:
                return  # never opened: nothing to end
            error = self._errors.get(id(run))
            if error is not None and status == "FINISHED":
                runs.end_run(run.result(), "FAILED", one_line(error))
            else:
                runs.end_run(run.result(), status, reason)

        self._submit(call)

    def run_id(self, run: Future) -> str:
        return run.result()

    def error(self, run: Future) -> BaseException | None:
        """The first error of the run's writes made so far, opening it included."""
        if run.done() and not run.cancelled() and run.exception() is not None:
            return run.exception()
        return self._errors.get(id(run))

    def sync(self) -> None:
        pass  # errors are the runs' own: error(run)

    def flush(self, abandon: bool = False) -> None:
        """Waits until every write submitted so far is made (or failed). With abandon, an
        interruption of the wait drops the writes not yet begun."""
        try:
            wait(self._pending)
        except BaseException:
            if abandon:
                for future in self._pending:
                    future.cancel()  # the thread skips it
            self._pending = [f for f in self._pending if not f.done()]
            raise
        self._pending = []

    def close(self) -> None:
        """The thread ends once it has made what is queued."""
        self._queue.put(None)

    def _submit(self, call: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._pending.append(future)
        self._queue.put((future, call))
        return future

    def _serve(self) -> None:
        while (item := self._queue.get()) is not None:
            future, call = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except BaseException as error:
                    future.set_exception(error)
