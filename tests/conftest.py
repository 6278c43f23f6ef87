"""Shared fixtures: the real FashionMNIST, a compose() that shrinks the run, a CLI runner."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fashion_sweep.data import prepare_raw

PROJECT = Path(__file__).resolve().parents[1]
CONF = PROJECT / "conf"
DATA = PROJECT / "data"
# Small but real: enough images that a run learns something in seconds.
# A sweep's trials, smaller still: seconds each.
TINY = [
    "sweep=optuna",
    "data.train_size=1000",
    "data.val_size=500",
    "data.test_size=200",
    "trainer.epochs=1",
]
SMALL = ["data.train_size=2000", "data.test_size=500", "trainer.epochs=2", "optimizer.lr=0.1"]
# How far Adam's losses may move when only the float summation order changes (packed
# members, a CUDA-graphed step): Adam divides each weight's step by the running RMS of
# its gradient, so a rounding difference in a gradient whose terms nearly cancel becomes
# a step difference of up to lr in that weight. Measured on the CPU: noise of 2**-23 x
# max|g| added to the default Adam's gradients moved a 2-epoch, 2,000-image run's
# losses by 1.5e-3 (train) and 6.3e-3 (test) relative and 5 of 1,000 test images; the
# same noise moves SGD's by under 1e-7 (rel 1e-4 is SGD's tolerance).
ADAM_LOSS_REL = 2e-2
ADAM_ACCURACY = 0.01


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

    def _compose(*overrides: str, config: str = "train", hydra: bool = False):
        with initialize_config_dir(config_dir=str(CONF)):
            return hydra_compose(
                config,
                overrides=[f"data.root={data_root}", *overrides],
                return_hydra_config=hydra,
            )

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


def wait_for(condition, what: str, timeout: float = 300) -> None:
    """Polls `condition` until it holds; fails the test naming `what` after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"never saw {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend: str, cwd: Path, workers: int = 1):
    """The real `mlflow server` on loopback; yields its URL once it answers."""
    port = free_port()
    server = subprocess.Popen(
        [
            Path(sys.executable).with_name("mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            str(cwd / "mlartifacts"),
            "--workers",
            str(workers),
        ],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer within 60 s")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
