"""Passwords in URIs never leave the process: log records, Hydra's .hydra/ files, MLflow.

A URI may carry a password (`postgresql://me:secret@host/db`, `http://user:token@host`)
when a user types one on the command line. `redact` masks it; `mask_log_records`
masks every log record the process makes, whichever logger, handler or library makes
it (Hydra's launchers log each job's overrides, Optuna and SQLAlchemy their URLs).
runs.py masks what goes to MLflow; sweeps/callbacks.py's `RedactHydraFiles` rewrites
the .hydra/ files Hydra has just saved for a job.
"""

from __future__ import annotations

import logging
import re
from typing import Any

_PASSWORD = re.compile(r"(://[^/:@\s\\'\"]+)(\\?:)[^@/\s'\"]+@")


def redact(text: str) -> str:
    """Hides the password of a URI: postgresql://me:secret@host/db -> me:***@host (also
    in Hydra's logged overrides, which escape the colon as `\\:`)."""
    return _PASSWORD.sub(r"\1\2***@", text)


def one_line(error: BaseException) -> str:
    """An error as one line, `Type: first line of its message`, passwords masked."""
    text = str(error).strip().splitlines()
    return redact(f"{type(error).__name__}: {text[0] if text else ''}")[:500]


def mask_log_records() -> None:
    """Every log record this process makes from now on has its URIs' passwords masked,
    in its message and in the traceback it carries."""
    make = logging.getLogRecordFactory()
    if getattr(make, "masks_passwords", False):
        return

    def masked(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: the handler reports it, as it would
            return record
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        safe = redact(message)
        if safe != message:
            record.msg, record.args = safe, ()
        return record

    masked.masks_passwords = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(masked)
