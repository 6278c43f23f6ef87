"""Shared fixtures: the real FashionMNIST, a compose() that shrinks the run, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fashion_sweep.data import prepare_raw

PROJECT = Path(__file__).resolve().parents[1]
CONF = PROJECT / "conf"
DATA = PROJECT / "data"
# Small but real: enough images that a run learns something in seconds.
SMALL = ["data.train_size=2000", "data.test_size=500", "trainer.epochs=2", "optimizer.lr=0.1"]


@pytest.fixture(scope="session")
def data_root() -> Path:
    prepare_raw(DATA)
    return DATA


@pytest.fixture
def store(tmp_path) -> str:
    """A fresh MLflow SQLite store for one test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def compose(data_root):
    """compose(*overrides, config="train") with the real data root already set."""
    # note: Hydra is imported here, not at the top, so tests/test_cuda.py runs without it
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fashion_sweep.config import register_configs

    register_configs()

    def _compose(*overrides: str, config: str = "train"):
        with initialize_config_dir(config_dir=str(CONF)):
            return hydra_compose(config, overrides=[f"data.root={data_root}", *overrides])

    return _compose


def run_cli(cwd: Path, module: str, *args: str, timeout: float = 600):
    """Runs `python -m fashion_sweep.<module> data.root=<real data> *args` in cwd."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", f"fashion_sweep.{module}", f"data.root={DATA}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli(tmp_path, data_root):
    """cli(module, *overrides) runs the real command in tmp_path."""
    return lambda module, *args, **kw: run_cli(tmp_path, module, *args, **kw)
