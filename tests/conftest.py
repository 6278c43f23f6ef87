"""Shared fixtures: the real FashionMNIST, a compose() that shrinks the run, the real
commands run in this process (`main`) or as processes (`cli`)."""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from fashion_sweep import mistakes
from fashion_sweep.core.data import prepare_raw

PROJECT = Path(__file__).resolve().parents[1]
CONF = PROJECT / "conf"
DATA = PROJECT / "data"
# Small but real: enough images that a run learns something in seconds.
# A sweep's trials, smaller still: seconds each. The preset's learning rates stop at 0.1
# here: above it plain SGD is chaotic, and a trial at lr 0.76 diverged on one CPU's
# kernels and not on another's (tests/test_packed.py's PACKED_REL says more).
TINY = [
    "sweep=optuna",
    "data.train_size=1000",
    "data.val_size=500",
    "data.test_size=200",
    "trainer.epochs=1",
    "optimizer.lr=tag(log,interval(1e-4,0.1))",
    # the best model's registration (a second a sweep) is test_sweep's shared sweep's
    "tracking.registered_model=null",
]
SMALL = ["data.train_size=2000", "data.test_size=500", "trainer.epochs=2", "optimizer.lr=0.1"]
# Tolerances of the equivalence tests (`-m equivalence`), from what rounding alone does
# to a trial. In float32 it is too much to compare anything by: a 2-epoch, 2,000-image
# trial alone moved by up to 1.4e-2 in test loss and 13 of 1,000 test images between
# ATEN_CPU_CAPABILITY=default, avx2 and avx512 (SGD at lr 0.1, momentum 0.9), by 1.6e-4
# at lr 0.1 without momentum, and by 1e-5 at lr 0.01 (a ReLU flipping at one weight);
# noise of 2**-23 x max|g| in its gradients moved Adam's by 1.4e-2; a packed member and
# its trial alone differed by up to 9e-2 (Adam at lr 1e-2, 2 epochs). In float64 the same
# comparisons moved by at most 1.1e-14 under all three kernels, for SGD up to lr 0.2
# with momentum 0.9 and Adam up to lr 1e-2: what two orders of float64 sums differ by,
# after the chaos of training has multiplied it. So the packed members are compared
# with their trials alone in float64 (tests/test_packed.py), at 1e-10.
PACKED_REL = 1e-10
# The CUDA-graphed step against the eager one, in float32 on a GPU (tests/test_cuda.py):
# the same kernels, but capturable Adam keeps its step count on the device, which
# changes the order of its float32 arithmetic; Adam turns a rounding difference in a
# gradient whose terms nearly cancel into a step difference of up to lr. Noise of
# 2**-23 x max|g| moved the default Adam's 2-epoch losses by up to 6.3e-3 relative and
# 5 of 1,000 test images on the CPU.
ADAM_LOSS_REL = 2e-2
ADAM_ACCURACY = 0.01


@pytest.fixture(scope="session")
def data_root() -> Path:
    prepare_raw(DATA)
    return DATA


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow store, its tables made by MLflow's own migrations (1.1 s of them
    here) once per session, in write-ahead-log mode as the harness makes it. Where a
    test is not about a store's first use, its store starts as a copy of this one."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    make = (
        "import sys, fashion_sweep.tracking.runs\n"
        "from mlflow.tracking import MlflowClient\n"
        "MlflowClient(f'sqlite:///{sys.argv[1]}').search_experiments()\n"
    )
    # in a process of its own: its end closes the store, folding the log into the file
    subprocess.run([sys.executable, "-c", make, str(path)], check=True, capture_output=True)
    return path


def copy_store(template: Path, folder: Path) -> Path:
    """An empty, set-up MLflow store (a copy of `template`) as folder/mlflow.db."""
    target = Path(folder) / "mlflow.db"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, target)
    return target


@pytest.fixture
def seed(mlflow_template):
    """seed(folder): copy_store into `folder`."""
    return lambda folder: copy_store(mlflow_template, folder)


@pytest.fixture
def store(tmp_path, seed) -> str:
    """An MLflow SQLite store of its own for one test, set up and empty."""
    return f"sqlite:///{seed(tmp_path)}"


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


@dataclass
class Ran:
    """What a command did: its exit status and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def trial_log(cwd: Path, trial: int) -> str:
    """What trial `trial` of the sweep run in `cwd` wrote: its folder's train.log (the
    sweep's console has one line per trial)."""
    (path,) = cwd.glob(f"multirun/*/*/{trial}/train.log")
    return path.read_text()


@pytest.fixture(autouse=True)
def _no_tracking_uri_inherited():
    """MLflow 3's set_tracking_uri also sets MLFLOW_TRACKING_URI in this process's
    environment, which every process a later test starts inherits (another app's
    MlflowApp sweep then logged into an earlier test's store): unset before each test and
    after it, so that a module's fixture set up next inherits none either."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def forget() -> None:
    """What a process keeps between its sweeps' trials, dropped between two commands run
    in the test process: open studies and stores, the frozen heap, and joblib's worker
    processes (reused from call to call, each in the folder it was started in)."""
    from hydra.core.global_hydra import GlobalHydra
    from joblib.externals.loky import get_reusable_executor

    from fashion_sweep import run
    from fashion_sweep.sweeps import pruning, study
    from fashion_sweep.tracking import runs

    GlobalHydra.instance().clear()
    get_reusable_executor().shutdown(wait=True)
    study.forget()
    pruning.forget()
    runs.forget()
    if run.settle_heap.cache_info().currsize:
        run.settle_heap.cache_clear()
        gc.unfreeze()


def run_main(module: str, *args: str, cwd: Path) -> int:
    """`python -m fashion_sweep.<module> data.root=<real data> *args` in this process,
    through the module's own Hydra main, in `cwd`; its exit status."""
    entry = importlib.import_module(f"fashion_sweep.{module}")
    argv, folder = sys.argv, os.getcwd()
    sys.argv = [module, f"data.root={DATA}", *args]
    os.chdir(cwd)
    forget()
    try:
        with mistakes.in_one_line():  # as the command: Hydra's refusals in one line
            entry.main()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        forget()
        sys.argv = argv
        os.chdir(folder)
    return 0


@pytest.fixture
def main(tmp_path, data_root, capfd, monkeypatch):
    """main(module, *args, cwd=tmp_path): run_main, with what it printed: a Ran. What a
    process is for (signals, kill -9, the single run's MLflow process, its imports) is
    tested with `cli`."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def call(module: str, *args: str, cwd: Path = tmp_path) -> Ran:
        capfd.readouterr()
        code = run_main(module, *args, cwd=cwd)
        out, err = capfd.readouterr()
        return Ran(code, out, err)

    return call


@pytest.fixture
def sweep(main, seed, tmp_path):
    """sweep(*args, cwd=tmp_path): `-m` with TINY and `args`, in this process, its
    MLflow store (./mlflow.db) set up already."""

    def run(*args: str, cwd: Path = tmp_path) -> Ran:
        seed(cwd)
        return main("train", "-m", *TINY, *args, cwd=cwd)

    return run


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
