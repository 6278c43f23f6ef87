"""Real `python -m fashion_sweep.train -m sweep=optuna` sweeps on a small real subset, run
in this process (tests/conftest.py's `main`), the joblib launcher's trials in its worker
processes. (The real `mlflow server` serving a sweep: test_scale.py.)"""

from __future__ import annotations

import contextlib
import html
import io
import json
import re
import shutil
import sqlite3
import subprocess
import urllib.request
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from fashion_sweep.tracking import names
from tests.conftest import DATA, TINY, copy_store, mlflow_server, run_main, trial_log

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "chromium"  # Debian's, installed by `make test`


def results(cwd: Path) -> dict:
    (path,) = cwd.glob("multirun/*/*/optimization_results.yaml")
    return OmegaConf.to_container(OmegaConf.load(path))


def runs(cwd: Path):
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fashion_sweep")
    found = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in found if r.data.tags["fashion_sweep.kind"] == "sweep"]
    children = [r for r in found if r.data.tags["fashion_sweep.kind"] == "train"]
    return client, parents, children


def study(cwd: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd / 'optuna.db'}")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, data_root, mlflow_template):
    """One real 3-trial sweep, shared by the tests that only read what it left (its
    console in console.txt)."""
    cwd = tmp_path_factory.mktemp("sweep")
    copy_store(mlflow_template, cwd)
    args = ["hydra.sweeper.n_trials=3", "hydra.sweeper.study_name=demo"]
    args += ["tracking.registered_model=fashion_sweep"]  # the default, which TINY turns off
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        assert run_main("train", "-m", *TINY, *args, cwd=cwd) == 0
    (cwd / "console.txt").write_text(console.getvalue())
    return cwd


def test_sweep_writes_results_and_keeps_every_trial_in_the_study(swept):
    found = results(swept)
    assert found["study_name"] == "demo" and found["optimized_metric"] == "val/accuracy"
    assert (found["finished"], found["complete"], found["failed"]) == (3, 3, 0)
    assert set(found["best_params"]) == {"optimizer.lr", "data.batch_size"}
    trials = study(swept, "demo").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert max(t.value for t in trials) == found["best_value"]
    for t in trials:
        assert 1e-4 <= t.params["optimizer.lr"] <= 0.1  # TINY's space
        assert t.params["data.batch_size"] in (32, 64, 128, 256)
    for db in ("optuna.db", "mlflow.db"):  # commits without a disk sync each
        with sqlite3.connect(swept / db) as connection:
            assert connection.execute("pragma journal_mode").fetchone() == ("wal",)
    trial_dirs = sorted(p.name for p in swept.glob("multirun/*/*/*") if p.is_dir())
    assert trial_dirs == ["0", "1", "2"]
    for t in trials:  # each job's record holds its own trial's values
        (job,) = swept.glob(f"multirun/*/*/{t.number}/.hydra")
        config = OmegaConf.load(job / "config.yaml")
        assert config.optimizer.lr == t.params["optimizer.lr"]
        assert config.data.batch_size == t.params["data.batch_size"]
        assert config.tracking.trial == t.number and config.data.train_size == 1000
        overrides = OmegaConf.load(job / "overrides.yaml")
        assert f"tracking.trial={t.number}" in overrides and "sweep=optuna" in overrides


def test_sweep_lands_in_mlflow_as_parent_and_children(swept):
    client, (parent,), children = runs(swept)
    found = results(swept)
    assert parent.info.status == "FINISHED" and "demo" in parent.info.run_name
    assert parent.info.run_id == found["parent_run_id"]
    assert sorted(int(c.data.tags["trial"]) for c in children) == [0, 1, 2]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"val/accuracy", "test/accuracy"} <= set(child.data.metrics)
        assert child.data.params["data.val_size"] == "500"
        assert "model.pth" in {a.path for a in client.list_artifacts(child.info.run_id)}
    # honest selection: the best trial is the best on validation, whatever the test says
    by_trial = {c.data.tags["trial"]: c.info.run_id for c in children}
    linked = {str(t.number): t.user_attrs["mlflow_run_id"] for t in study(swept, "demo").trials}
    assert linked == by_trial  # each Optuna trial names its own MLflow run
    best = max(children, key=lambda c: c.data.metrics["val/accuracy"])
    assert parent.data.tags["best_run_id"] == best.info.run_id == found["best_run_id"]
    assert parent.data.metrics["val/accuracy"] == best.data.metrics["val/accuracy"]
    assert parent.data.tags["best.optimizer.lr"] == best.data.params["optimizer.lr"]
    assert parent.data.tags["best.data.batch_size"] == best.data.params["data.batch_size"]
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {
        "plots/optimization_history.png",
        "plots/param_importances.png",
        "plots/lr_x_batch_size.png",
        "plots/sweep.html",
    }


def test_runs_are_named_so_a_trial_can_be_told_from_another(swept):
    _, (parent,), children = runs(swept)
    assert parent.info.run_name == "demo (3 trials)"
    for child in children:
        lr, bs = float(child.data.params["optimizer.lr"]), child.data.params["data.batch_size"]
        assert child.info.run_name == f"trial {child.data.tags['trial']} lr={lr:.3g} bs={bs}"
    # the space and the fixed values, as params of the parent
    assert parent.data.params["optimizer.lr"] == "log-uniform(0.0001, 0.1)"
    assert parent.data.params["data.batch_size"] == "choice(32, 64, 128, 256)"
    assert parent.data.params["trainer.epochs"] == "1"
    assert parent.data.params["data.train_size"] == "1000"


def test_the_parent_runs_description_links_the_best_trial_and_the_compare_view(swept):
    _, (parent,), children = runs(swept)
    note = parent.data.tags["mlflow.note.content"]
    best = results(swept)["best_run_id"]
    experiment = parent.info.experiment_id
    (winner,) = [c for c in children if c.info.run_id == best]
    assert f"**Best: [{winner.info.run_name}](#/experiments/{experiment}/runs/{best})**" in note
    assert f"val/accuracy **{winner.data.metrics['val/accuracy']:.4g}**" in note
    assert f"test/accuracy **{winner.data.metrics['test/accuracy']:.4g}**" in note
    (link,) = re.findall(r"\[compare the 3 runs side by side\]\(([^)\s]+)\)", note)
    assert '"' not in link  # a raw quote ends a markdown link in MLflow's renderer
    runs_json = unquote(re.search(r"runs=([^&]+)", link).group(1))
    assert sorted(json.loads(runs_json)) == sorted(c.info.run_id for c in children)
    for image in ("optimization_history", "param_importances", "lr_x_batch_size"):
        assert f"get-artifact?path=plots%2F{image}.png&run_uuid={parent.info.run_id})" in note


def test_the_interactive_plots_and_the_study_name_the_metric(swept):
    client, (parent,), _ = runs(swept)
    page = Path(client.download_artifacts(parent.info.run_id, "plots/sweep.html", swept))
    text = page.read_text()
    for title in ("Optimization history", "Slice", "Parallel coordinates", "Contour", "Timeline"):
        assert f"<h2>{title}" in text
    assert text.count("plotly.js v") == 1  # plotly.js inline once: it opens offline
    assert "val/accuracy" in text and "Objective Value" not in text
    assert study(swept, "demo").metric_names == ["val/accuracy"]


def test_the_console_says_one_line_per_trial_and_where_the_answer_is(swept):
    console = (swept / "console.txt").read_text()
    found = results(swept)
    lines = re.findall(
        r"^\[(\d)/3\] trial (\d) lr=\S+ bs=\d+  val/accuracy (\S+)  .*$", console, re.M
    )
    assert [done for done, _, _ in lines] == ["1", "2", "3"], console
    said = console.splitlines()
    per_trial = [line for line in said if re.match(r"\[\d+/3\] ", line)]
    assert all("ETA" in line for line in per_trial[:2]) and "ETA" not in per_trial[2]
    best = f"best {found['best_value']:.4g} (trial {found['best_trial']})"
    assert per_trial[2].endswith(best)
    # the trials' own lines are in their logs, the harness's keys nowhere on the console
    assert "Epoch 1" not in console and "Test Error" not in console
    assert "tracking." not in console
    parent = found["parent_run_id"]
    assert re.search(
        rf"Sweep run: http://127.0.0.1:5000/#/experiments/\d+/runs/{parent}$", console, re.M
    )
    assert "Compare the trials: http://127.0.0.1:5000/#/compare-runs?runs=%5B" in console
    assert f"python -m fashion_sweep.predict run_id={found['best_run_id']}" in console
    assert f"Best: trial {found['best_trial']} lr=" in console
    # the answer is said before the seconds of plots (and the model's registration)
    (said_at,) = re.findall(r"^\[([\d-]+ [\d:]+,\d+)\]\[HYDRA\] Best: ", console, re.M)
    said = datetime.strptime(said_at, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    (plotted,) = swept.glob(f"mlruns/*/{parent}/artifacts/plots/sweep.html")
    assert said < plotted.stat().st_mtime


def test_each_trials_output_is_in_its_own_log(swept):
    _, _, children = runs(swept)
    for child in children:
        (log,) = swept.glob(f"multirun/*/*/{child.data.tags['trial']}/train.log")
        text = log.read_text()
        assert text.startswith(f"# {child.info.run_name}\n")
        assert "Epoch 1" in text and "Test Error" in text and 'Predicted: "' in text
        assert f"in MLflow run {child.info.run_id}" in text  # its own run, not another's


def test_predict_best_uses_the_best_trials_model(swept, main):
    best = results(swept)["best_run_id"]
    store = f"tracking.uri=sqlite:///{swept / 'mlflow.db'}"
    for run_id in ("best", results(swept)["parent_run_id"]):
        shown = main("predict", f"run_id={run_id}", store, cwd=swept)
        assert shown.returncode == 0, shown.stderr
        assert f"MLflow run {best}" in shown.stdout
        assert re.search(r'^Predicted: ".+", Actual: "Ankle boot"$', shown.stdout, re.M)


def rendered(url: str) -> str:
    """The page at `url` as headless Chromium renders it (MLflow's UI is a script)."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000"]
        + ["--virtual-time-budget=20000"]
        + ["--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_mlflow_ui_shows_the_sweeps_answer_from_its_run_in_one_click(swept):
    """The parent run's page in MLflow's own UI (the real server, a real browser): its
    description's links open the compare view of every trial and the trials, best
    first, with no error."""
    _, (parent,), children = runs(swept)
    experiment = parent.info.experiment_id
    with mlflow_server(f"sqlite:///{swept / 'mlflow.db'}", swept) as ui:
        page = rendered(f"{ui}/#/experiments/{experiment}/runs/{parent.info.run_id}")
        hrefs = dict(
            (html.unescape(text), html.unescape(href))
            for href, text in re.findall(r'<a [^>]*href="([^"]+)"[^>]*>([^<]+)</a>', page)
        )
        compare = rendered(f"{ui}/{hrefs['compare the 3 runs side by side']}")
        assert "Comparing 3 Runs" in compare and "Error" not in compare
        # the parallel coordinates open on the optimized metric (each epoch logs it first)
        chosen = re.sub(r"<[^>]*>", " ", compare[compare.index("Metrics:") :][:3000])
        assert re.sub(r"\s+", " ", chosen).startswith("Metrics: val/accuracy &nbsp; Clear All")
        for child in children:
            assert child.info.run_name in compare
        best_first = rendered(f"{ui}/{hrefs['the trials, best first']}")
        order = sorted(children, key=lambda c: -c.data.metrics["val/accuracy"])
        shown = [best_first.find(f">{c.info.run_name}<") for c in order]
        assert -1 not in shown and shown == sorted(shown), "the trials, best first"
        assert "optimizer.lr" in best_first  # a column
        images = re.findall(r'<img src="(get-artifact\?[^"]+)"', page)
        assert len(images) == 3  # the plots, inline in the description
        for src in images:
            with urllib.request.urlopen(f"{ui}/{html.unescape(src)}") as served:
                assert served.headers["Content-Type"] == "image/png"


def test_the_best_model_is_registered_and_predicts_what_predict_prints(swept, main):
    import mlflow.pyfunc

    from fashion_sweep.core.data import load_splits
    from fashion_sweep.core.model import CLASSES
    from fashion_sweep.sweeps import winner

    found = results(swept)
    assert found["best_model_uri"] == "models:/fashion_sweep/1"
    client, (parent,), _ = runs(swept)
    (version,) = client.search_model_versions("name = 'fashion_sweep'")
    assert version.run_id == found["best_run_id"]  # the trial's run holds it (Models column)
    mlflow.set_tracking_uri(f"sqlite:///{swept / 'mlflow.db'}")
    loaded = mlflow.pyfunc.load_model("models:/fashion_sweep/latest")
    assert loaded.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 1, 28, 28)
    images = load_splits(DATA, test_size=8)["test"]
    batch = np.stack([images[i][0].numpy() for i in range(8)])
    logits = loaded.predict(batch)  # any batch size, not the example's one image
    assert logits.shape == (8, 10)
    # the sweep's end once more (a resume, another worker): the same version, no other
    again = OmegaConf.create({"tracking": {"uri": f"sqlite:///{swept / 'mlflow.db'}"}})
    again.tracking.registered_model = "fashion_sweep"
    assert winner.register(again, found["best_run_id"]) == "models:/fashion_sweep/1"
    assert len(client.search_model_versions("name = 'fashion_sweep'")) == 1
    store = f"tracking.uri=sqlite:///{swept / 'mlflow.db'}"
    for index in (0, 7):
        shown = main(
            "predict", "run_id=models:/fashion_sweep/latest", f"index={index}", store, cwd=swept
        )
        assert shown.returncode == 0, shown.stderr
        assert f"MLflow run {found['best_run_id']}, test image {index}" in shown.stdout
        assert f'Predicted: "{CLASSES[logits[index].argmax()]}"' in shown.stdout


def test_diverging_trial_is_failed_and_the_sweep_goes_on(sweep, tmp_path):
    done = sweep(
        "hydra/sweeper/sampler=grid",
        "optimizer.lr=choice(0.05,10000.0)",
        "data.batch_size=64",
        "trainer.log_interval=2",
        "hydra.sweeper.study_name=bad",
        "hydra.sweeper.max_failure_rate=0.5",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trials = {t.params["optimizer.lr"]: t for t in study(tmp_path, "bad").trials}
    assert trials[0.05].state == TrialState.COMPLETE
    assert trials[10000.0].state == TrialState.FAIL
    reason = "DivergedError: train/loss is nan at batch "  # its type named once
    assert trials[10000.0].user_attrs["failure_reason"].startswith(reason)
    _, (parent,), children = runs(tmp_path)
    status = {c.data.params["optimizer.lr"]: c for c in children}
    assert status["10000.0"].info.status == "FAILED"
    assert status["10000.0"].data.tags["failure_reason"].startswith(reason)
    assert status["0.05"].info.status == "FINISHED"
    assert parent.info.status == "FINISHED"
    # the console says it in one line; the traceback is in the trial's log, once
    failed = int(status["10000.0"].data.tags["trial"])
    assert re.search(
        rf"^\[\d/2\] trial {failed} lr=1e\+04  failed: DivergedError: ", done.stdout, re.M
    )
    assert "Error executing job" not in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert trial_log(tmp_path, failed).count("Traceback") == 1
    assert parent.data.tags["best_run_id"] == status["0.05"].info.run_id


@pytest.mark.parametrize("sampler", ["tpe", "grid"])
def test_a_space_smaller_than_n_trials_runs_each_configuration_once_and_says_so(
    sweep, tmp_path, sampler
):
    """One rule for every sampler: the sweep ends when the space is used up (a repeat
    would be the same trial, seed and all), says so, and its results say why."""
    args = [
        f"hydra/sweeper/sampler={sampler}",
        "data.batch_size=choice(16,32)",
        "optimizer.lr=0.01",
    ]
    done = sweep(*args, "hydra.sweeper.n_trials=5", "hydra.sweeper.study_name=small")
    assert done.returncode == 0, done.stderr[-3000:]
    trials = study(tmp_path, "small").trials
    assert sorted(
        t.params["data.batch_size"] for t in trials if t.state == TrialState.COMPLETE
    ) == [16, 32]
    used_up = "its 2 configurations have all run (hydra.sweeper.n_trials=5 asked for more)"
    assert f"Search space used up: {used_up}" in done.stdout + done.stderr
    assert re.findall(r"^\[(\d)/(\d)\] trial", done.stdout, re.M) == [("1", "2"), ("2", "2")]
    found = results(tmp_path)
    assert (found["n_trials"], found["ended"]) == (2, f"the search space is used up: {used_up}")
    # a repeat that stepped aside never ran: nothing was cut off and run again
    repeats = sum(t.user_attrs.get("interrupted") == "duplicate" for t in trials)
    assert (found["cut_off"], found["stepped_aside"]) == (0, repeats)
    _, (parent,), _ = runs(tmp_path)
    assert parent.info.run_name == "small (2 trials)"
    assert "cut off" not in parent.data.tags["mlflow.note.content"]


def momentum_too(config, trial) -> None:
    """A custom_search_space: one more parameter, not finite."""
    trial.suggest_float("optimizer.momentum", 0.0, 0.9)


def test_a_space_a_custom_search_space_extends_is_not_held_to_the_declared_points(sweep, tmp_path):
    extended = f"hydra.sweeper.custom_search_space={__name__}.momentum_too"
    args = ["data.batch_size=choice(16,32)", "optimizer.lr=0.01", extended]
    done = sweep(*args, "hydra.sweeper.n_trials=3", "hydra.sweeper.study_name=extended")
    assert done.returncode == 0, done.stderr[-3000:]
    complete = [t for t in study(tmp_path, "extended").trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and all("optimizer.momentum" in t.params for t in complete)
    assert "used up" not in done.stdout + done.stderr
    assert results(tmp_path)["ended"] == "hydra.sweeper.n_trials=3 trials finished"


def test_too_many_failures_stop_the_sweep_with_a_clear_error(sweep, main, tmp_path):
    done = sweep(
        "optimizer.lr=10000.0",
        "trainer.log_interval=2",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.max_failure_rate=0.25",
    )
    assert done.returncode == 1  # it ran and failed: not a mistake typed (2)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: 1 trials failed, more than hydra.sweeper.max_failure_rate=0.25 of "
        "hydra.sweeper.n_trials=3 allows; the first failed: DivergedError: train/loss is nan"
    ), last
    _, (parent,), children = runs(tmp_path)
    assert parent.info.status == "FAILED" and len(children) == 1
    assert children[0].info.status == "FAILED"
    # predict from that sweep says why it has no model
    store = f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"
    shown = main("predict", f"run_id={parent.info.run_id}", store)
    assert shown.returncode == 2
    assert shown.stderr.strip() == (
        f"error: sweep run {parent.info.run_id} has no best trial: it ended FAILED "
        f"(SweepFailed: {last.removeprefix('error: ')}) with no trial completed"
    )


def test_a_key_the_config_lacks_is_searched_and_its_name_logged_as_mlflow_takes_it(sweep, tmp_path):
    done = sweep("hydra.sweeper.n_trials=2", "+optimizer.dampening=interval(0,0.5)")
    assert done.returncode == 0, done.stderr[-2000:]
    found = results(tmp_path)
    dampening = found["best_params"]["+optimizer.dampening"]
    _, (parent,), children = runs(tmp_path)
    logged = names.to_mlflow("+optimizer.dampening")
    assert names.from_mlflow(logged) == "+optimizer.dampening"
    assert parent.data.params[logged] == "uniform(0.0, 0.5)"
    assert parent.data.tags[f"best.{logged}"] == str(dampening)
    values = {float(c.data.params["optimizer.dampening"]) for c in children}
    assert dampening in values and len(values) == 2  # each trial's run has its own


def test_a_multi_objective_sweep_reports_its_pareto_front_everywhere_a_user_looks(
    sweep, main, tmp_path
):
    done = sweep(
        "hydra.sweeper.n_trials=5",
        "optimized_metric=[val/accuracy,perf/epoch_seconds]",
        "hydra.sweeper.direction=[maximize,minimize]",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = results(tmp_path)
    held = study(tmp_path, found["study_name"]).get_trials()
    complete = [t for t in held if t.state == TrialState.COMPLETE]
    assert len(complete) == 5 and "best_value" not in found
    front = {s["trial"]: s for s in found["solutions"]}
    for t in complete:  # on the front exactly when no other trial is as good in both
        beaten = any(
            o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values
            for o in complete
        )
        assert (t.number in front) == (not beaten), t.number
    client, (parent,), children = runs(tmp_path)
    by_trial = {int(c.data.tags["trial"]): c for c in children}
    for number, solution in front.items():  # each value is its run's, named in its order
        run = by_trial[number]
        assert solution["run_id"] == run.info.run_id
        logged = [run.data.metrics["val/accuracy"], run.data.metrics["perf/epoch_seconds"]]
        assert solution["values"] == pytest.approx(logged)
    for number, run in by_trial.items():  # the MLflow UI filters the front by a tag
        assert run.data.tags["pareto_front"] == str(number in front).lower()
    assert parent.data.tags["pareto_front_trials"] == ",".join(map(str, front))
    assert (
        "**Pareto front** (val/accuracy, perf/epoch_seconds)"
        in parent.data.tags["mlflow.note.content"]
    )
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/pareto_front.png" in plots
    assert f"Pareto front ({len(front)} trial" in done.stdout + done.stderr
    # predict's best: there is no one best, and it says where to pick
    shown = main("predict", "run_id=best", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    assert shown.returncode == 2
    assert shown.stderr.strip().endswith(
        f"is a multi-objective sweep, whose Pareto front is trials "
        f"{parent.data.tags['pareto_front_trials']}: pick one by its run id (MLflow's UI: "
        "tags.pareto_front = 'true')"
    )


def test_a_sweep_in_which_no_trial_completed_fails_whatever_the_failure_rate_allows(
    sweep, tmp_path
):
    done = sweep(
        "optimizer.lr=10000.0", "hydra.sweeper.n_trials=2", "hydra.sweeper.max_failure_rate=1"
    )
    assert done.returncode == 1, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: no trial completed: 2 failed, 0 pruned, of 2 finished; ")
    assert line.endswith("the first failed: DivergedError: train/loss is nan (mean over the epoch)")
    _, (parent,), children = runs(tmp_path)
    assert parent.info.status == "FAILED" and len(children) == 2
    assert "no trial completed" in parent.data.tags["failure_reason"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lrx=interval(0.1,1)", "sweep parameter 'optimizer.lrx' is not a key"),
        ("data.batch_size=choice()", "empty choice is not legal"),
        ("optimizer.lr=interval(1,0.1)", "sweep parameter 'optimizer.lr'"),
        (
            "hydra.sweeper.direction=minimize",
            "direction=minimize would minimize val/accuracy; set it to maximize",
        ),
        ("hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials must be >= 1, got 0"),
        (
            "hydra.sweeper.n_trial=3",
            "Key 'n_trial' not in 'StudySweeperConf'. Did you mean: 'n_trials'?",
        ),
        (  # added with +: Hydra composes it, the sweeper refuses it
            "+hydra.sweeper.n_trial=3",
            "Could not add 'hydra.sweeper.n_trial': Key 'n_trial' not in 'StudySweeperConf'. "
            "Did you mean: 'n_trials'?",
        ),
        # a search space written under hydra.sweeper.params: the command line's form
        (
            "hydra.sweeper.params.optimizer.lr=interval(0.1,1)",
            "given as its key, 'optimizer.lr=interval(0.1,1)'",
        ),
    ],
)
def test_bad_sweep_overrides_fail_before_any_trial(sweep, tmp_path, override, message):
    """Each in one line, `error: ...`, exit status 2, like a single run's."""
    done = sweep(override)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert not list(tmp_path.glob("multirun/*/*/0"))


def test_joblib_launcher_runs_trials_in_parallel_without_losing_any(sweep, tmp_path):
    done = sweep(
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=4",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.study_name=parallel",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "database is locked" not in done.stderr + done.stdout
    trials = study(tmp_path, "parallel").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    client, (parent,), children = runs(tmp_path)
    assert sorted(int(c.data.tags["trial"]) for c in children) == [0, 1, 2, 3]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert len(client.get_metric_history(child.info.run_id, "val/accuracy")) == 1
        assert "model.pth" in {a.path for a in client.list_artifacts(child.info.run_id)}
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}
    # trials ran in joblib's two worker processes, not in the sweep's
    processes = {c.data.tags["process"] for c in children}
    sweeper = {t.user_attrs["worker"]["id"].rsplit(":", 1)[0] for t in trials}
    assert len(processes) == 2 and not processes & sweeper, (processes, sweeper)
    # the console: a line per trial, labelled, not the workers' own lines interleaved
    said = re.findall(r"^\[(\d)/4\] trial (\d) lr=", done.stdout, re.M)
    assert sorted(n for n, _ in said) == ["1", "2", "3", "4"], done.stdout
    assert "Epoch 1" not in done.stdout and "Epoch 1" in trial_log(tmp_path, 3)
    assert "tracking." not in done.stdout + done.stderr  # no echo of the jobs' overrides
