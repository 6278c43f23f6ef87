"""What a training run asks of its tracker: the interface the run recipe (run.py) is
written against. No MLflow here, so a single run's own process imports none.

Three trackers do it:
- `runs.InProcess`: MLflow calls in this process, each done when it returns;
- `side_process.SideProcess`: the same calls carried out in a process beside a single
  run (its MLflow imports overlap torch's); the per-epoch calls are not waited for, and
  an error in one is raised at the run's next call (or at `sync`);
- `writer.Writer`: the calls of a pack's runs made in order by one thread beside the
  training; a failed call breaks its own run only, which `error(run)` then returns.

A run handle is what `open_run` returned: a run id (InProcess, SideProcess) or a future
of one (Writer); `run_id(run)` is the id.
"""

from __future__ import annotations

from typing import Any, Protocol


class Tracker(Protocol):
    def use_experiment(self, uri: str, experiment: str) -> str:
        """Points at the store (checked, and set up on first use); the experiment's id."""

    def open_run(self, resolved: dict, tags: dict[str, str], overrides: list[str]) -> Any:
        """Starts a training run (params, tags, config.yaml); its handle."""

    def log_metrics(self, run: Any, metrics: dict[str, float], epoch: int) -> None: ...

    def mark_pruned(self, run: Any, epoch: int) -> None:
        """Tags the run as a trial its sweep's pruner stopped after `epoch`."""

    def log_model(self, run: Any, state_dict: dict[str, Any]) -> None:
        """The run's model.pth: exactly `torch.save(state_dict)`."""

    def end_run(self, run: Any, status: str, reason: str | None = None) -> None:
        """FINISHED, or FAILED/KILLED with `reason` as its failure_reason tag."""

    def run_id(self, run: Any) -> str: ...

    def error(self, run: Any) -> BaseException | None:
        """A call about `run` that failed and was recorded, not raised (Writer)."""

    def sync(self) -> None:
        """Raises the first error of a call not waited for (SideProcess)."""

    def flush(self, abandon: bool = False) -> None:
        """Returns once every call made so far is done; with abandon, an interruption of
        the wait drops the calls not yet begun."""
