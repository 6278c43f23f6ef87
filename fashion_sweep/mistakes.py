"""A command's mistakes in one line: what Hydra refuses (a misspelt key, an unknown
option, an override it cannot parse) and what our checks refuse, each as `error: ...`
and exit status 2; Ctrl-C, SIGTERM and SIGHUP as `error: interrupted...`, at any moment.

Hydra prints its own refusals over several lines and exits 1, unless HYDRA_FULL_ERROR
is set, when it raises them: `run` sets it (where the user has not) and says each in
one line, with Hydra's words, its "did you mean" included.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from hydra.errors import CompactHydraException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException

from fashion_sweep import signals

PARAMS = "hydra.sweeper.params."


class Failed(CompactHydraException):
    """A command that ran and failed (a sweep whose trials failed): exit status 1."""


def run(entry_point: Callable[[], object]) -> None:
    """Runs a `hydra.main` entry point as a command: its refusals in one line each,
    its interruptions ended as their signal ends a process."""
    try:
        with signals.interrupts(), in_one_line():  # also the work between a sweep's trials
            entry_point()
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP: the runs are ended
        with contextlib.suppress(OSError):  # no terminal left (SIGHUP)
            print(f"error: {signals.reason(stop)}", file=sys.stderr)
        signals.exit_like(stop)


@contextmanager
def in_one_line() -> Iterator[None]:
    """Inside the block Hydra raises its refusals (HYDRA_FULL_ERROR, unless the user set
    it: then Hydra's own report); each is said as `error: ...`, and SystemExit 2 (1 for
    a `Failed`)."""
    before = os.environ.get("HYDRA_FULL_ERROR")
    if before == "1":  # as Hydra reads it
        yield
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except (CompactHydraException, OmegaConfBaseException) as error:
        # an OmegaConf error: an interpolation that cannot be resolved, a value left ???
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(1 if isinstance(error, Failed) else 2)
    finally:
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


def one_line(error: BaseException) -> str:
    """Hydra's message for `error` (and the OmegaConf error behind it) on one line."""
    if isinstance(error, MissingConfigException):
        return _missing(error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    head, rest = (lines[0], lines[1:]) if lines else (type(error).__name__, [])
    parsing = re.fullmatch(r"Error when parsing index: \d+, string: (.*) out of \[.*\]\.", head)
    if parsing:
        head = f"cannot parse {parsing.group(1)!r}"
        rest = [line for line in rest if not line.startswith("See https")]
    sweeping = re.fullmatch(r"Sweeping over Hydra's configuration is not supported : '(.*)'", head)
    if sweeping and sweeping.group(1).startswith(PARAMS):
        return _params_hint(sweeping.group(1))
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        head = f"{head.rstrip('.')}: {str(cause).strip().splitlines()[0]}"
    return "; ".join(part.rstrip(".") for part in [head, *rest])


def _missing(error: MissingConfigException) -> str:
    """ "Could not find 'optimizer/nope'" and the options there are (not our schemas)."""
    text = str(error)
    first = text.splitlines()[0]
    listed = text.split("Config search path:")[0].splitlines()[1:]
    names = [line.strip() for line in listed if line.startswith("\t")]
    options = [name for name in names if not name.endswith("_schema")]
    return f"{first}; options: {', '.join(options)}" if options else first


def _params_hint(override: str) -> str:
    key, _, value = override[len(PARAMS) :].partition("=")
    return (
        f"{override}: on the command line a search space is given as its key, "
        f"'{key}={value}'; hydra.sweeper.params is for config files (conf/sweep/optuna.yaml)"
    )
