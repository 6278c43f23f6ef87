"""Hydra's basic launcher, without the copies of each job's config.

Hydra's run_job copies a job's config four times before the task starts: the `hydra`
node (142 of the sweep config's 178 nodes) for HydraConfig twice and for the JobReturn
once, and the whole config for the task: ~40 ms of a trial's ~180 ms outside its
training loop here (.ci/time_sweep_calls.py). Each job's config is its own already
(the config loader makes one per job), so this launcher's jobs use it as it is:
HydraConfig gets the job's `hydra` node, resolving against the job's config as with
Hydra, and the task a copy of the rest. All else is Hydra's run_job: the output dir,
chdir, job logging, the .hydra/ files, env_set, callbacks, a failed job's exception in
its JobReturn. `hydra/launcher: inline`, the sweeps' default (conf/sweep/optuna.yaml);
tests/test_launcher.py checks its jobs against the basic launcher's.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.execution_policy import execution_whitelist
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    JobRuntime,
    JobStatus,
    _flush_loggers,
    _log_job_error_to_file,
    _save_config,
    configure_log,
    env_override,
    filter_overrides,
    setup_globals,
)
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, flag_override, open_dict, read_write

log = logging.getLogger(__name__)


@dataclass
class InlineLauncherConf:
    _target_: str = "fashion_sweep.launcher.InlineLauncher"


ConfigStore.instance().store(
    group="hydra/launcher", name="inline", node=InlineLauncherConf, provider="fashion_sweep"
)


class InlineLauncher(BasicLauncher):
    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        """BasicLauncher.launch, each job run by run_job below."""
        setup_globals()
        assert self.hydra_context is not None and self.config is not None
        whitelist = self.hydra_context.execution_whitelist
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose, whitelist)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs locally")
        runs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            config = self.hydra_context.config_loader.load_sweep_config(
                self.config, list(overrides)
            )
            with open_dict(config):
                config.hydra.job.id = str(idx)
                config.hydra.job.num = idx
            runs.append(run_job(self.hydra_context, self.task_function, config))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose, whitelist)
        return runs


def run_job(
    hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
) -> JobReturn:
    """hydra.core.utils.run_job for a sweep job whose `config` nothing else holds."""
    with execution_whitelist(hydra_context.execution_whitelist, reset=True):
        return _run_job(hydra_context, task_function, config)


def _run_job(
    hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
) -> JobReturn:
    callbacks = hydra_context.callbacks
    old_cwd = os.getcwd()
    orig_hydra_cfg = HydraConfig.instance().cfg
    hydra_cfg = HydraConfig.instance().cfg = _hydra_view(config)
    output_dir = os.path.join(
        str(OmegaConf.select(config, "hydra.sweep.dir")),
        str(OmegaConf.select(config, "hydra.sweep.subdir")),
    )
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = os.path.abspath(output_dir)
    chdir = None
    try:
        ret = JobReturn()
        # the task's config: a copy of all but `hydra`, which the copy shares, then drops
        hydra_node = config._get_node("hydra")
        task_cfg = copy.deepcopy(config, {id(hydra_node): hydra_node})
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        ret.cfg = task_cfg
        with read_write(config.hydra.job.env_set):
            OmegaConf.resolve(config.hydra.job.env_set)
        ret.hydra_cfg = hydra_cfg
        ret.overrides = OmegaConf.to_container(config.hydra.overrides.task)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        chdir = config.hydra.job.chdir
        if chdir:
            os.chdir(output_dir)
            ret.working_dir = output_dir
        else:
            ret.working_dir = os.getcwd()
        configure_log(
            config.hydra.job_logging, config.hydra.verbose, hydra_context.execution_whitelist
        )
        if config.hydra.output_subdir is not None:
            hydra_output = Path(config.hydra.runtime.output_dir) / config.hydra.output_subdir
            _save_config(task_cfg, "config.yaml", hydra_output)
            _save_config(hydra_cfg, "hydra.yaml", hydra_output)
            _save_config(config.hydra.overrides.task, "overrides.yaml", hydra_output)
        ret.task_name = JobRuntime.instance().get("name")
        with env_override(config.hydra.job.env_set):
            callbacks.on_job_start(config=config, task_function=task_function)
            try:
                ret.return_value = task_function(task_cfg)
                ret.status = JobStatus.COMPLETED
            except Exception as error:  # the sweeper reads it from the JobReturn
                ret.return_value = error
                ret.status = JobStatus.FAILED
                _log_job_error_to_file()
            except BaseException as error:  # interrupted: the end hooks see it, then it goes on
                ret.return_value = error
                ret.status = JobStatus.FAILED
                raise
            finally:
                _flush_loggers()
                callbacks.on_job_end(config=config, job_return=ret)
        return ret
    finally:
        HydraConfig.instance().cfg = orig_hydra_cfg
        if chdir:
            os.chdir(old_cwd)


def _hydra_view(config: DictConfig) -> DictConfig:
    """What HydraConfig.set_config(config) makes, `{hydra: <config's hydra node>}`
    read-only and resolving against `config`, with the node itself, not a copy."""
    OmegaConf.set_readonly(config.hydra, True)
    view = OmegaConf.create()
    with flag_override(view, "no_deepcopy_set_nodes", True):
        view["hydra"] = config._get_node("hydra")
    view.hydra._set_parent(config)
    return view
