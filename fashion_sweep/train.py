"""`python -m fashion_sweep.train [key=value ...]`: the PyTorch Quickstart, tracked in MLflow.

`-m sweep=optuna` turns the same command into an Optuna sweep (conf/sweep/optuna.yaml,
docs/sweeps.md). The recipe is run.py; this is the command around it.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # a single run: its MLflow process starts now, beside torch's import
    from fashion_sweep import signals

    signals.hold()  # a Ctrl-C during the imports is acted on once they are done
    from fashion_sweep.tracking import side_process

    side_process.start(sys.argv[1:])

import contextlib
import shutil
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fashion_sweep import signals
from fashion_sweep.config import CONF_DIR, ConfigError, plain, register_configs
from fashion_sweep.core.data import DataError
from fashion_sweep.core.engine import DivergedError
from fashion_sweep.run import Objective, settle_heap, train
from fashion_sweep.tracking import side_process
from fashion_sweep.tracking.redaction import mask_log_records

# What hydra.callbacks may name (conf/train.yaml, conf/sweep/optuna.yaml).
CALLBACKS = [
    "fashion_sweep.sweeps.callbacks.RedactHydraFiles",
    "fashion_sweep.sweeps.callbacks.ReportToStudy",
    "fashion_sweep.sweeps.callbacks.CheckJobs",
]

register_configs()
mask_log_records()  # whatever logs a URI in this process (a launcher, a store) masks it


@hydra.main(config_path=CONF_DIR, config_name="train", execution_whitelist=CALLBACKS)
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    tracker = side_process.take()  # a single run's MLflow process, started by __main__
    if tracker is not None and multirun:  # hydra.mode=MULTIRUN, set without -m
        tracker.close()
        tracker = None
    try:
        with signals.interrupts(), _watched(multirun):  # also in a launcher's worker process
            prune = ended = None
            if multirun:  # a single run imports no Optuna
                from fashion_sweep.sweeps.pruning import ended_elsewhere, pruning

                prune, ended = pruning(cfg, hydra_cfg), ended_elsewhere(cfg, hydra_cfg)
            overrides = [plain(line) for line in hydra_cfg.overrides.task]
            with _output(cfg, multirun):
                trained = train(cfg, overrides, prune, tracker, ended)
        return Objective.of(trained, cfg.optimized_metric)
    except (
        ConfigError,
        DataError,
        DivergedError,
        side_process.AgentError,
        OmegaConfBaseException,  # an override whose value cannot be resolved
    ) as error:
        if multirun:
            raise  # the sweeper records the trial as failed and goes on
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        if isinstance(error, DivergedError | side_process.AgentError):
            sys.exit(1)
        _forget(hydra_cfg.runtime.output_dir, OmegaConf.to_container(hydra_cfg.overrides.task))
        sys.exit(2)
    finally:
        if tracker is not None:
            tracker.close()
        if multirun:
            settle_heap()


def _forget(folder: str, overrides: list[str]) -> None:
    """A refused run's folder, left by Hydra with nothing but its .hydra/ record and an
    empty log: removed (and its date's folder, if that is left empty). Kept where
    anything else is there: another run started in the same second shares it."""
    path = Path(folder)
    record = path / ".hydra" / "overrides.yaml"
    if not record.is_file() or OmegaConf.to_container(OmegaConf.load(record)) != overrides:
        return
    if any(p.stat().st_size for p in path.glob("*") if p.is_file()):
        return
    if all(p.name == ".hydra" or p.is_file() for p in path.iterdir()):
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # only if empty


def _watched(multirun: bool) -> contextlib.AbstractContextManager:
    """A sweep's job in a process a launcher started (joblib, submitit) uses the cores
    it was given, and stops, its process exiting, when the sweep worker that launched it
    dies (sweeps/workers.py)."""
    if not multirun:
        return contextlib.nullcontext()
    from fashion_sweep.sweeps.workers import fit_threads, watched

    fit_threads(HydraConfig.get().launcher)
    return watched()


def _output(cfg: DictConfig, multirun: bool) -> contextlib.AbstractContextManager:
    """Where a sweep trial's output goes: its trial folder's log (sweeps/trial_output.py)."""
    if not multirun:
        return contextlib.nullcontext()
    from fashion_sweep.sweeps import trial_output

    job = HydraConfig.get()
    if not trial_output.wanted(cfg, job):
        return contextlib.nullcontext()
    return trial_output.to_files([job], f"# {cfg.tracking.run_name}")


if __name__ == "__main__":
    # note: run the imported module's main, not __main__'s, so the joblib launcher can
    # pickle the task function by reference (a __main__ function is pickled by value)
    from fashion_sweep import mistakes
    from fashion_sweep.train import main as entry_point

    mistakes.run(entry_point)
