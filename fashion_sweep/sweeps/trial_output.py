"""A sweep trial's own output (the tutorial's lines, warnings, log records, a traceback)
in its trial folder's log file, Hydra's `<job name>.log`, rather than on the sweep's
console, where progress.py says one line per trial. `hydra.sweeper.trial_output=console`
keeps it on the console as a plain multirun prints it."""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from omegaconf import DictConfig

TO_FILE = "file"
CONSOLE = "console"


def log_path(hydra: DictConfig) -> Path:
    """A trial's log file from its job's Hydra config: Hydra's job log in the trial's
    folder (made here if its job has not started yet, as a pack's later members')."""
    folder = Path(str(hydra.sweep.dir), str(hydra.sweep.subdir))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{hydra.job.name}.log"


def note(hydra: DictConfig, line: str) -> None:
    """A line at the end of a trial's log file."""
    with open(log_path(hydra), "a") as f:
        f.write(line.rstrip("\n") + "\n")


def wanted(config: DictConfig, hydra: DictConfig) -> bool:
    """Whether this job is a trial of our sweeper whose output goes to its file."""
    if config.tracking.get("trial") is None:
        return False
    return hydra.sweeper.get("trial_output", CONSOLE) == TO_FILE


class _Tee:
    """A text stream that writes to several files (a pack's members' logs); a continuous
    pack's members join (`add`) and leave (`drop`) it."""

    def __init__(self, files: list[TextIO]) -> None:
        self.files = files

    def add(self, hydras: list[DictConfig], header: str) -> None:
        for hydra in hydras:
            self.files.append(open(log_path(hydra), "a", buffering=1))  # noqa: SIM115
            self.files[-1].write(header.rstrip("\n") + "\n")

    def drop(self, hydras: list[DictConfig]) -> None:
        paths = {str(log_path(hydra)) for hydra in hydras}
        for f in [f for f in self.files if f.name in paths]:
            self.files.remove(f)
            f.close()

    def close(self) -> None:
        for f in self.files:
            f.close()

    def write(self, text: str) -> int:
        for f in self.files:
            f.write(text)
        return len(text)

    def flush(self) -> None:
        for f in self.files:
            f.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def to_files(hydras: list[DictConfig], header: str) -> Iterator[_Tee]:
    """Sends stdout, stderr and the console's log records to the trials' log files (of
    their jobs' Hydra configs) while the block runs, with `header` first and any
    error's traceback last."""
    out = _Tee([])
    with contextlib.closing(out):
        out.add(hydras, header)
        root = logging.getLogger()
        consoles = [h for h in root.handlers if _console(h)]
        mirror = logging.StreamHandler(out)  # the records the console would have shown
        if consoles:
            mirror.setFormatter(consoles[0].formatter)
        files_have_them = any(isinstance(h, logging.FileHandler) for h in root.handlers)
        for handler in consoles:
            root.removeHandler(handler)
        if not files_have_them:
            root.addHandler(mirror)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):  # type: ignore[type-var]
                yield out
        except Exception:
            if not files_have_them:  # else Hydra logs it there ("Job failed")
                traceback.print_exc(file=out)
            raise
        except BaseException:  # an interruption, which Hydra does not log
            traceback.print_exc(file=out)
            raise
        finally:
            root.removeHandler(mirror)
            for handler in consoles:
                root.addHandler(handler)
            out.flush()


def _console(handler: Any) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )
