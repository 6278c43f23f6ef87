"""What a run checks and prepares before it starts, so that bad input fails in one line
before any work: the config's values, against torch too (check), the device it names
(resolve_device), then the data files and the MLflow store (prepare). A sweep's
pre-check (sweeps/opening.py) and a plain multirun's (sweeps/callbacks.py) use the same."""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from fashion_sweep.config import ConfigError, validate
from fashion_sweep.core.data import prepare_raw
from fashion_sweep.tracking.tracker import Tracker

# What a config's _target_ may name (Hydra 1.4 asks instantiate() for a whitelist, and
# checks the name a class is defined under too: fashion_sweep.model is core/model.py's)
MODELS = ["fashion_sweep.model.*", "fashion_sweep.core.model.*"]
TARGETS = [*MODELS, "torch.optim.*"]
# Optimizer options that torch refuses only at a first step (capturable Adam on a CPU;
# differentiable, on a model's own params), which check() therefore takes
STEP_CHECKED = ("capturable", "fused", "differentiable")


def resolve_device(name: str) -> torch.device:
    """auto: cuda, then mps, then cpu; a named device must exist here."""
    name = getattr(name, "value", name)  # a Device enum from the config, or a str
    available = ["cpu"]
    if torch.cuda.is_available():
        available.insert(0, "cuda")
    if torch.backends.mps.is_available():
        available.insert(-1, "mps")
    if name == "auto":
        return torch.device(available[0])
    if name not in available:
        raise ConfigError(
            f"trainer.device={name}, but {name} is not available on this machine "
            f"(available: {', '.join(available)})"
        )
    return torch.device(name)


def check(cfg: DictConfig, try_step: bool = True) -> torch.device:
    """The config's values, and the device they name; raises ConfigError. An optimizer
    option of STEP_CHECKED is tried with one zero-gradient step on that device, unless
    try_step is false (a process that will not train, which must not hold a CUDA context:
    the runs it starts check for themselves)."""
    validate(cfg)
    device = resolve_device(cfg.trainer.device)
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    target = optimizer.pop("_target_")
    if any(fnmatch(target, allowed) for allowed in TARGETS):  # instantiate() refuses the rest
        try:  # what torch refuses in combination (nesterov with dampening), on one tensor
            get_class(target)([torch.zeros(1, requires_grad=True)], **optimizer)
        except (ImportError, TypeError, ValueError, RuntimeError) as error:
            raise ConfigError(f"optimizer: {str(error).splitlines()[0]}", ("optimizer",)) from None
        if try_step and any(optimizer.get(option) for option in STEP_CHECKED):
            try:
                param = torch.zeros(1, device=device, requires_grad=True)
                param.grad = torch.zeros_like(param)
                get_class(target)([param], **optimizer).step()
            except (RuntimeError, AssertionError, TypeError, ValueError) as error:
                why = f"{str(error).splitlines()[0]} (at a first step on {device})"
                raise ConfigError(f"optimizer: {why}", ("optimizer",)) from None
    if cfg.trainer.cuda_graph and device.type != "cuda":
        raise ConfigError(f"trainer.cuda_graph=true needs CUDA, but this run is on {device}")
    return device


def in_process() -> Tracker:
    # note: imported after the checks, so bad input fails without waiting for mlflow
    from fashion_sweep.tracking.runs import InProcess

    return InProcess()


def prepare(cfg: DictConfig, tracker: Tracker | None = None) -> None:
    """The data files (unpacked on first use), then the MLflow store (reached, and set
    up on first use). Raises DataError or StoreError in one line."""
    prepare_raw(cfg.data.root, cfg.data.download)
    (tracker or in_process()).use_experiment(cfg.tracking.uri, cfg.tracking.experiment)
