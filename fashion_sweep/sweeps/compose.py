"""Compose a sweep's config once, not once per trial.

Hydra's launchers call `config_loader.load_sweep_config(master, overrides)` for every
job, which composes the whole config again (defaults list, files, schema): about
0.15 s a trial here, as long as a sixth of a 1-epoch trial on 10,000 images. Trials
of a sweep differ in values (`optimizer.lr=0.01`), which Hydra applies last, to the
composed config. So this loader composes once per set of group choices
(`optimizer=adam`) and applies the values to a copy, in Hydra's order, as Hydra does
(`OmegaConf.update` of each override's value). A trial with any other kind of override
(`+`, `++`, `~`, `@package`, `hydra.`), or a value that cannot be applied (a key not
in the config, a wrong type), is composed by Hydra in full, errors and all.
tests/test_compose.py checks the result equals Hydra's.

It also puts each job in the sweep folder its worker claimed (sweeps/opening.py).
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

from hydra.core.override_parser.types import Override, OverrideType
from omegaconf import DictConfig, OmegaConf, read_write
from omegaconf.errors import OmegaConfBaseException

from fashion_sweep.config import parser

# Composed configs by (loader token, the overrides that shape the composition). Kept
# at module level so a loader pickled to a worker process (joblib) caches there too.
_COMPOSED: dict[tuple[str, tuple[str, ...]], DictConfig] = {}
_ABSENT = object()


class ComposeOnce:
    """Hydra's config loader, composing once per sweep; all else passes through."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self._token = uuid.uuid4().hex
        self._parsed: dict[str, Override] = {}  # the parser is slow; trials repeat lines
        self.sweep_dir: str | None = None  # the sweep folder of this worker, once claimed

    def __getattr__(self, name: str) -> Any:
        if "_loader" not in self.__dict__:  # being unpickled (joblib, submitit)
            raise AttributeError(name)
        return getattr(self._loader, name)

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> Any:
        config = self._compose(master_config, list(sweep_overrides))
        if self.sweep_dir is not None:
            with read_write(config.hydra.sweep):
                config.hydra.sweep.dir = self.sweep_dir
        return config

    def _compose(self, master_config: DictConfig, sweep_overrides: list[str]) -> Any:
        parsed = [self._parse(line) for line in sweep_overrides]
        groups = set(master_config.hydra.runtime.choices)
        kinds = [self._kind(o, groups) for o in parsed]
        if None in kinds:
            # an add, a delete, a package or Hydra's own settings: Hydra composes it all
            return self._loader.load_sweep_config(master_config, sweep_overrides)
        values = [o for o, kind in zip(parsed, kinds, strict=True) if kind == "value"]
        choices = [o.input_line for o, kind in zip(parsed, kinds, strict=True) if kind == "choice"]
        key = (self._token, tuple(choices))
        if key not in _COMPOSED:
            _COMPOSED[key] = self._loader.load_sweep_config(master_config, choices)
        config = copy.deepcopy(_COMPOSED[key])
        try:
            with read_write(config):  # struct stays on: a key that is not there is an error
                for override in values:
                    path = override.key_or_group
                    if OmegaConf.select(config, path, default=_ABSENT) is _ABSENT:
                        raise KeyError(path)
                    OmegaConf.update(config, path, override.value(), merge=True)
                config.hydra.overrides.task = sweep_overrides  # all of them, in order
        except (KeyError, OmegaConfBaseException):
            # Hydra composes it again, to fail with its own message
            return self._loader.load_sweep_config(master_config, sweep_overrides)
        OmegaConf.copy_cache(from_config=master_config, to_config=config)
        return config

    def _parse(self, line: str) -> Override:
        if line not in self._parsed:
            (self._parsed[line],) = parser().parse_overrides([line])
        return self._parsed[line]

    def _kind(self, override: Override, groups: set[str]) -> str | None:
        """ "choice" for `group=option` (optimizer=adam), "value" for `key=value` on a
        config node (applied after composition, changing nothing else), None for the
        rest: adds, deletes, packages, sweeps, Hydra's own settings."""
        if (
            override.type != OverrideType.CHANGE
            or override.package is not None
            or override.is_sweep_override()
            or override.is_hydra_override()
            or "/" in override.key_or_group  # a nested config group
        ):
            return None
        return "choice" if override.key_or_group in groups else "value"
