"""A searched key's name as MLflow takes it for a param or tag, and back.

Hydra searches any key it accepts, `+optimizer.dampening` included (`+`: a key the
config does not have yet); MLflow's names take letters, digits, `_ - . /` and spaces.
Each other character becomes `_xHH_` (its code in hex): `+optimizer.dampening` is the
parent run's param `_x2b_optimizer.dampening`, and `from_mlflow` gives the key back (a
key that itself holds `_x`, two hex digits and `_` would not come back whole; Hydra's
keys do not). A trial's own run logs the key as its config has it
(`optimizer.dampening`: `in_config`).
"""

from __future__ import annotations

import re

_KEPT = re.compile(r"[A-Za-z0-9_./ -]")
_CODED = re.compile(r"_x([0-9a-f]{2,6})_")


def to_mlflow(key: str) -> str:
    return "".join(c if _KEPT.fullmatch(c) else f"_x{ord(c):02x}_" for c in key)


def from_mlflow(name: str) -> str:
    return _CODED.sub(lambda m: chr(int(m.group(1), 16)), name)


def in_config(key: str) -> str:
    """The key a trial's config, and so its run's params, holds for a searched key."""
    return key.lstrip("+")
