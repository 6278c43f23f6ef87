"""The Hydra callbacks that conf/ lists (hydra.callbacks), for every job of every run.

- `RedactHydraFiles` (conf/train.yaml): each job's .hydra/ files with passwords masked.
- `CheckJobs` (conf/train.yaml): a plain multirun (`-m optimizer.lr=0,0.1`, Hydra's basic
  sweeper) checks every job's config as a run would before the first job starts.
- `ReportToStudy` (conf/sweep/optuna.yaml): each trial's outcome recorded in its study
  from the process that ran it, as its job returns, so no signal arriving afterwards
  can lose it.

A single run instantiates the first two: nothing here imports Optuna or MLflow until a
sweep's job needs it.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fashion_sweep.config import ConfigError
from fashion_sweep.core.data import DataError
from fashion_sweep.sweeps.compose import ComposeOnce
from fashion_sweep.tracking.redaction import redact

log = logging.getLogger(__name__)


class RedactHydraFiles(Callback):
    """Rewrites the .hydra/ files of a job (config, hydra config, overrides) with the
    passwords masked. Hydra saves them just before it calls on_job_start."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        subdir = config.hydra.output_subdir
        if subdir is None:
            return
        for path in (Path(config.hydra.runtime.output_dir) / subdir).glob("*.yaml"):
            text = path.read_text()
            if redact(text) != text:
                path.write_text(redact(text))


class CheckJobs(Callback):
    """Checks every job of a plain multirun (check, prepare) before the first starts, and
    refuses a bad one in one line (exit status 2); Optuna sweeps check theirs in
    opening.py."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from fashion_sweep.preflight import check, prepare

        if not config.hydra.sweeper._target_.endswith(".BasicSweeper"):
            return
        params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
        parsed = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
        swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
        loader = ComposeOnce(GlobalHydra.instance().config_loader())
        try:
            # the basic sweeper's own expansion (tests/test_internals.py pins it)
            (jobs,) = BasicSweeper.split_arguments(parsed, None)
            configs = [loader.load_sweep_config(config, job) for job in jobs]
        except Exception:  # a range, a key that is not there: Hydra's sweeper says so itself
            return
        # every job's values first, then data and store; each job, where it trains, takes
        # check()'s first optimizer step itself
        for step in (functools.partial(check, try_step=False), prepare):
            for number, (job, run) in enumerate(zip(jobs, configs, strict=True)):
                try:
                    step(run)
                except (ConfigError, DataError) as error:
                    which = " ".join(line for line in job if line.split("=")[0] in swept)
                    # note: Hydra turns a callback's exceptions into warnings: exit here
                    print(f"error: job {number} ({which}): {error}", file=sys.stderr)
                    sys.exit(2)


class ReportToStudy(Callback):
    """Records each trial's outcome from the process that ran it, as its job returns. A
    job cut off by a signal is left to the sweep, which marks it so. A result that comes
    after the sweep cut its trial off (a resume found its worker gone) is not recorded,
    and its run ends as the sweep ended it (KILLED), whatever the job ended it as."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from fashion_sweep.sweeps import schedule
        from fashion_sweep.sweeps.study import held, outcome_of, record, trial
        from fashion_sweep.sweeps.trial_output import TO_FILE
        from fashion_sweep.tracking.runs import end_run

        name, number = config.tracking.get("study"), config.tracking.get("trial")
        if not name or number is None:
            return
        found = trial(config.hydra.sweeper.get("storage"), name, number)
        if found is None:
            return
        quiet = config.hydra.sweeper.get("trial_output") == TO_FILE  # its log has it all
        tracking = config.tracking
        ended = outcome_of(job_return, tracking.uri, tracking.parent_run_id, number, quiet)
        if ended is None:
            return
        outcome, run_id = ended
        if record(*found, outcome, run_id):
            return
        now = held(config.hydra.sweeper.get("storage"), name, number)
        if now is None or not schedule.cut_off(now):
            return  # recorded already, as its run ended (by a sweep that found it dead)
        why = schedule.run_reason(now.user_attrs.get(schedule.CUT_OFF))
        log.warning(f"Trial {number} had been cut off before its result came ({why}): not recorded")
        if run_id:
            end_run(run_id, "KILLED", why, uri=tracking.uri)
