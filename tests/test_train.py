"""End to end on a real subset: what a run leaves in MLflow, and how bad input fails.

The train and predict commands run once each as the user runs them (a process, with
the single run's MLflow process beside it); the rest runs them in this process."""

from __future__ import annotations

import os
import re
import socket
import sqlite3

import pytest
import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from fashion_sweep.config import ConfigError
from fashion_sweep.core.data import load_splits, make_loaders, prepare_raw
from fashion_sweep.core.engine import DivergedError, evaluate
from fashion_sweep.preflight import check
from fashion_sweep.run import train
from tests.conftest import SMALL, copy_store

PERF = ("perf/epoch_seconds", "perf/eval_seconds", "perf/samples_per_second")


def only_run(store: str):
    client = MlflowClient(store)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], max_results=10
    )
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


@pytest.fixture(scope="module")
def logged(tmp_path_factory, data_root, mlflow_template):
    """One real 2-epoch run on 2,000 + 500 images, logged to its own store."""
    from hydra import compose, initialize_config_dir

    from fashion_sweep.config import register_configs
    from tests.conftest import CONF

    store = f"sqlite:///{copy_store(mlflow_template, tmp_path_factory.mktemp('store'))}"
    register_configs()
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose("train", [f"data.root={data_root}", f"tracking.uri={store}", *SMALL])
    metrics = train(cfg, ["trainer.epochs=2"]).metrics
    client, run = only_run(store)
    return cfg, metrics, client, run


def test_run_is_finished_with_dotted_params_and_tags(logged):
    cfg, _, _, run = logged
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["optimizer.lr"] == "0.1"
    assert params["optimizer._target_"] == "torch.optim.SGD"
    assert params["data.batch_size"] == "64"
    assert params["model.width"] == "512" and params["model.depth"] == "2"
    assert params["data.train_size"] == "2000" and params["trainer.epochs"] == "2"
    tags = run.data.tags
    assert tags["device"] == "cpu"
    assert tags["torch_version"] == torch.__version__
    assert tags["process"] == f"{socket.gethostname()}:{os.getpid()}"
    assert re.fullmatch(r"[0-9a-f]{40}", tags.get("git_commit", "0" * 40))
    assert tags["overrides"] == "trainer.epochs=2"


def test_metrics_are_logged_per_epoch(logged):
    _, metrics, client, run = logged
    expected = {"train/loss", "test/loss", "test/accuracy", *PERF}
    assert set(run.data.metrics) == expected
    for key in expected:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    accuracy = client.get_metric_history(run.info.run_id, "test/accuracy")
    assert all(0 <= m.value <= 1 for m in accuracy)
    assert accuracy[-1].value == metrics["test/accuracy"] > 0.3  # learnt something
    assert run.data.metrics["perf/samples_per_second"] > 0


@pytest.mark.equivalence
def test_logged_model_reproduces_logged_accuracy(logged, data_root, tmp_path):
    _, metrics, client, run = logged
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pth", "config.yaml", "overrides.yaml"} <= artifacts
    config = OmegaConf.load(client.download_artifacts(run.info.run_id, "config.yaml", tmp_path))
    model = instantiate(config.model, _execution_whitelist_=["fashion_sweep.*"])
    state = torch.load(client.download_artifacts(run.info.run_id, "model.pth", tmp_path))
    model.load_state_dict(state)
    splits = load_splits(data_root, test_size=config.data.test_size)
    loaders = make_loaders(splits, "torch", config.data.batch_size, torch.device("cpu"))
    result = evaluate(loaders["test"], model, torch.nn.CrossEntropyLoss(), torch.device("cpu"))
    assert result["accuracy"] == metrics["test/accuracy"]
    assert result["loss"] == pytest.approx(metrics["test/loss"], rel=1e-6)


def test_same_seed_same_metrics_and_validation_split(compose, store, logged):
    _, first, _, _ = logged
    cfg = compose(*SMALL, f"tracking.uri={store}", "trainer.device=cpu")
    again = train(cfg).metrics
    assert {k: v for k, v in again.items() if k not in PERF} == {
        k: v for k, v in first.items() if k not in PERF
    }
    with_val = train(compose(*SMALL, f"tracking.uri={store}", "data.val_size=500")).metrics
    assert {"val/loss", "val/accuracy"} <= set(with_val)


def test_diverging_run_is_failed_with_reason(compose, store):
    cfg = compose(*SMALL, f"tracking.uri={store}", "optimizer.lr=1e4", "trainer.log_interval=5")
    with pytest.raises(DivergedError):
        train(cfg)
    _, run = only_run(store)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"].startswith("DivergedError: train/loss is")


@pytest.mark.slow
def test_cli_prints_the_tutorial_and_predict_reads_the_run(cli, main, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = cli("train", *SMALL, f"tracking.uri={store}")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Using cpu device\nEpoch 1\n-------------------------------\n" in out
    assert re.search(r"^loss: \d\.\d{6}  \[   64/ 2000\]$", out, re.M)
    assert re.search(r"^Test Error: \n Accuracy: \d+\.\d%, Avg loss: \d\.\d{6} \n$", out, re.M)
    assert "Done!\n" in out
    _, run = only_run(store)
    assert run.info.status == "FINISHED"
    assert (tmp_path / "mlruns").is_dir()  # artifacts beside the store, MLflow's default
    trained_line = re.search(r'^Predicted: "(.+)", Actual: "Ankle boot"$', out, re.M)
    shown = cli("predict", f"run_id={run.info.run_id}", f"tracking.uri={store}")
    assert shown.returncode == 0, shown.stderr
    assert f'Predicted: "{trained_line.group(1)}", Actual: "Ankle boot"' in shown.stdout
    other = main("predict", "run_id=latest", "index=1", f"tracking.uri={store}")  # the only run
    assert re.search(r'^Predicted: ".+", Actual: "Pullover"$', other.stdout, re.M)
    missing = main("predict", "run_id=0123abc", f"tracking.uri={store}")
    assert missing.returncode == 2 and "run_id=0123abc" in missing.stderr


BAD = [  # Hydra's refusals with its own words, its "did you mean" kept; then ours
    ("optimizer.lrr=0.1", "Key 'lrr' not in 'SGDConfig'. Did you mean: 'lr'?"),
    ("optimzer.lr=0.1", "Did you mean one of: 'optimizer', 'optimized_metric'?"),
    ("data.batch_size=big", "data.batch_size"),
    ("optimizer=rmsprop", "Could not find 'optimizer/rmsprop'; options: adam, adamw, sgd"),
    ("optimizer.lr=[1", "cannot parse 'optimizer.lr=[1'"),
    ("sweep=optuan", "Could not find 'sweep/optuan'; options: confirmed, optuna"),  # not ignored
    ("launcher=slrum", "Could not find 'launcher/slrum'; options: local, slurm"),
    ("optimizer.lr=???", "optimizer.lr: no value given (???): set it"),
    ("optimizer.lr=${oops}", "Interpolation key 'oops' not found"),
    ("optimizer.lr=0", "optimizer.lr must be a finite number > 0"),
    ("data.batch_size=0", "data.batch_size must be > 0"),
    ("data.test_size=20000", "data.test_size"),
]


@pytest.mark.parametrize("override, named", BAD, ids=[b[0] for b in BAD])
def test_bad_input_fails_in_one_line_before_training(main, tmp_path, monkeypatch, override, named):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # as Hydra reads it: not set
    store = tmp_path / "mlflow.db"
    done = main("train", override, f"tracking.uri=sqlite:///{store}")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and named in line, done.stderr
    assert "Epoch 1" not in done.stdout
    assert not store.exists() or no_runs(store)
    assert not list(tmp_path.glob("multirun/*"))  # no empty record of a refused run


def no_runs(store) -> bool:
    with sqlite3.connect(store) as db:
        return db.execute("select count(*) from runs").fetchone()[0] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_is_refused_without_cuda(main, tmp_path):
    done = main("train", "trainer.device=cuda", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: trainer.device=cuda, but cuda is not available on this machine (available: cpu)"
    )


def test_an_optimizer_option_torch_refuses_at_its_first_step_is_refused_before_the_run(compose):
    """torch checks capturable's device, and differentiable's params, only at the first
    step: check() takes that step on the run's device, so the run is refused before it
    starts, in one line."""
    cpu = "trainer.device=cpu"
    with pytest.raises(ConfigError) as refused:
        check(compose(cpu, "optimizer=adam", "+optimizer.capturable=true"))
    assert str(refused.value).startswith("optimizer: If capturable=True, params and ")
    assert str(refused.value).endswith("(at a first step on cpu)")
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match="^optimizer: a leaf Variable that requires grad"):
        check(compose(cpu, "+optimizer.differentiable=true"))
    assert check(compose(cpu, "optimizer=adam", "+optimizer.fused=true")).type == "cpu"
    with pytest.raises(ConfigError, match="^optimizer: `fused` and `foreach` cannot be `True`"):
        check(compose(cpu, "+optimizer.fused=true", "+optimizer.foreach=true"))  # a RuntimeError


def test_truncated_data_is_refused(main, tmp_path):
    root = tmp_path / "data"
    images = prepare_raw(root) / "train-labels-idx1-ubyte"
    images.write_bytes(images.read_bytes()[:-10])
    done = main("train", f"data.root={root}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "train-labels-idx1-ubyte is truncated" in line and "apt-get install" in line
    assert not (tmp_path / "m.db").exists() or no_runs(tmp_path / "m.db")
