"""Pruning, with real sweeps on a data subset (in this process; the joblib and submitit
launchers' trials in their own processes): hopeless trials stop after an epoch, PRUNED in
the study, FINISHED and tagged in MLflow, counted, kept on resume. (That a single run
imports no Optuna: tests/test_startup.py.)"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
from pathlib import Path

import optuna
import pytest
from hydra.utils import instantiate as hydra_instantiate
from joblib import cpu_count
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from tests.conftest import trial_log

pytestmark = pytest.mark.slow
# 3 epochs on 2,000 images; a learning rate of 1e-6 stays at chance, 0.3 learns
LOSERS = (1e-6, 2e-6)
SPACE = [
    "sweep=optuna",
    "data.train_size=2000",
    "data.val_size=500",
    "data.test_size=200",
    "trainer.epochs=3",
    "data.batch_size=64",
    f"optimizer.lr=choice(0.3,{LOSERS[0]},{LOSERS[1]})",
    "hydra/sweeper/pruner=median",
    "hydra.sweeper.pruner.n_startup_trials=1",  # after one finished trial, compare
    "hydra.sweeper.study_name=pruned",
]


@pytest.fixture
def sweep(main, seed, tmp_path):
    def run(*args: str):
        seed(tmp_path)
        done = main("train", "-m", *SPACE, *args)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    return run


def trials(cwd: Path) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{cwd / 'optuna.db'}"
    ran = optuna.load_study(study_name="pruned", storage=storage).trials
    return [t for t in ran if t.state != TrialState.FAIL]  # not the draws that stepped aside


def check_pruned(cwd: Path, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    """What a user sees of the pruned trials: in the study, in MLflow, in the results."""
    found = trials(cwd)
    assert len(found) == n_trials
    first = min(found, key=lambda t: t.number)
    assert first.state == TrialState.COMPLETE  # the pruner's startup trial runs in full
    pruned = [t for t in found if t.state == TrialState.PRUNED]
    assert pruned, [(t.number, t.state, t.params) for t in found]
    for trial in found:  # a loser after the first trial is pruned at its first epoch
        if trial.params["optimizer.lr"] in LOSERS and trial is not first:
            assert trial.state == TrialState.PRUNED and trial.user_attrs["pruned"] == 1
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    for trial in found:
        epochs = sorted(trial.intermediate_values)
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val/accuracy")
        assert [m.step for m in history] == epochs  # one value per epoch it ran
        assert [m.value for m in history] == [trial.intermediate_values[e] for e in epochs]
        if trial.state == TrialState.PRUNED:
            assert run.data.tags["pruned"] == str(epochs[-1]) == str(trial.user_attrs["pruned"])
            assert epochs[-1] < 3
        else:
            assert "pruned" not in run.data.tags and epochs == [1, 2, 3]
    results = [OmegaConf.load(p) for p in cwd.glob("multirun/*/*/optimization_results.yaml")]
    assert results[-1].pruned == len(pruned)
    parent = client.get_run(results[-1].parent_run_id)
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/intermediate_values.png" in plots
    return found


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit-local"])
def test_hopeless_trials_are_pruned_recorded_and_kept_on_resume(sweep, tmp_path, launcher):
    args = ["hydra.sweeper.n_trials=3"]
    if launcher == "joblib":  # each trial in a worker process, reporting to the shared study
        args += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    if launcher == "submitit-local":  # each trial a job of submitit's, as on a cluster
        args += ["launcher=local", "hydra.sweeper.n_jobs=1"]  # one after another, as above
    done = sweep(*args)
    # the sweep's line for the trial, and the trial's own line in its log
    said = re.findall(r"^\[\d/3\] trial (\d) .*  pruned after epoch 1 .*$", done.stdout, re.M)
    assert said, done.stdout
    for number in said:
        assert "Pruned after epoch 1: its val/accuracy is behind" in trial_log(tmp_path, number)
    before = check_pruned(tmp_path, n_trials=3)
    if launcher != "basic":  # each trial in a worker process, not the sweep's
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        runs = [client.get_run(t.user_attrs["mlflow_run_id"]) for t in before]
        assert f"{socket.gethostname()}:{os.getpid()}" not in {r.data.tags["process"] for r in runs}
    if launcher == "submitit-local":
        assert list(tmp_path.glob("multirun/*/*/.submitit/*"))  # submitit's own job folders
        # each task on the one core launcher=local gives it, not on all of them
        assert {r.data.tags["threads"] for r in runs} == {"1"}
    if launcher == "joblib":  # joblib's workers share the cores
        assert {r.data.tags["threads"] for r in runs} == {str(max(1, cpu_count() // 2))}
    if launcher == "basic":  # the same command again: nothing runs, nothing changes
        sweep(*args)
        after = check_pruned(tmp_path, n_trials=3)
        assert [(t.number, t.state) for t in after] == [(t.number, t.state) for t in before]


def test_a_pruner_without_a_shared_study_is_refused_before_the_first_trial(main, tmp_path):
    done = main("train", "-m", *SPACE, "hydra.sweeper.storage=null")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: hydra.sweeper.pruner needs a study its trials can reach: set "
        "hydra.sweeper.storage to a database (sqlite:///optuna.db), not null"
    )
    assert not list(tmp_path.glob("multirun/*/*/0"))


def test_a_pruned_member_leaves_its_pack_and_the_rest_train_on(main, seed, tmp_path, monkeypatch):
    """hydra/launcher=packed: trials 2 and 3 join the pack as trials 0 and 1 end (the
    pack's epoch 3); trial 2 (a loser) is pruned after its epoch 1 and stops being
    computed, trial 3 trains on to its 3 epochs. The pack's reports of each epoch were
    one round of its pruners' reads (sweeps/pruning.py)."""
    from fashion_sweep.sweeps import pruning

    rounds = []
    one_round = pruning.one_round
    monkeypatch.setattr(pruning, "one_round", lambda: rounds.append(1) or one_round())
    space = [arg for arg in SPACE if not arg.startswith("optimizer.lr=")]
    seed(tmp_path)
    done = main(
        "train",
        "-m",
        *space,
        "optimizer.lr=choice(0.3,1e-6,0.2,2e-6)",
        "hydra/sweeper/sampler=grid",
        "hydra/launcher=packed",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=4",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    said = trial_log(tmp_path, 3)  # the pack's lines, in each member's log
    assert "Trials 2, 3 join the pack, each from its epoch 1" in said
    # each epoch of the pack says what it took
    epoch_line = r"Epoch 4: 1 of 2 trials train on \(the pack's epoch: [\d.]+ s training, [\d.]+ s"
    assert re.search(epoch_line, said), said[-2000:]
    assert "The pack goes on with trials 3" in said  # trial 2 no longer computed
    found = {t.number: t for t in trials(tmp_path)}
    assert found[2].params["optimizer.lr"] in LOSERS and found[2].state == TrialState.PRUNED
    assert found[3].state == TrialState.COMPLETE
    assert sorted(found[3].intermediate_values) == [1, 2, 3]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for number, epochs in ((2, [1]), (3, [1, 2, 3])):
        run = client.get_run(found[number].user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val/accuracy")
        assert [m.step for m in history] == epochs
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "model.pth" in files
    assert run.data.metrics["val/accuracy"] == found[3].value
    assert len(rounds) == 6  # the pack's epochs: 3 of trials 0 and 1, 3 of trials 2 and 3


def test_a_continuous_pack_fills_a_pruned_members_place_at_once(main, seed, tmp_path):
    """hydra/launcher=packed (continuous by default), 2 slots, 6 trials: as a loser is
    pruned after its first epoch, the next trial joins the pack at once, beside a member
    that is mid-way through its epochs, and each counts its own epochs (in the study,
    in MLflow). Each trial that ran in full under both ends as under the basic launcher."""
    space = [arg for arg in SPACE if not arg.startswith("optimizer.lr=")]
    space += ["optimizer.lr=choice(0.3,1e-6,0.2,2e-6,0.1,3e-6)", "hydra/sweeper/sampler=grid"]
    # the grid's order with this seed: 3e-6, 0.2, then 0.1 and 1e-6 join as those end,
    # and 0.3 takes the place of 1e-6, pruned, while 0.1 trains on
    space += ["hydra.sweeper.sampler.seed=5", "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=6"]
    values = {}
    for launcher in ("packed", "basic"):
        cwd = tmp_path / launcher
        seed(cwd)
        done = main("train", "-m", *space, f"hydra/launcher={launcher}", cwd=cwd)
        assert done.returncode == 0, done.stderr[-3000:]
        found = check_pruned(cwd, 6)
        values[launcher] = {
            t.params["optimizer.lr"]: t.value for t in found if t.state == TrialState.COMPLETE
        }
        if launcher == "packed":
            logs = "".join(trial_log(cwd, number) for number in range(6))
            # a trial joined next to one still training: the pack stayed full
            assert re.search(r"Trials \d join the pack, each from its epoch 1; it trains 2", logs)
    # (the pruner may judge a trial otherwise: what the study holds at its epochs differs)
    both = values["packed"].keys() & values["basic"].keys()
    assert len(both) >= 3, values
    for lr in both:  # val/accuracy: at most 2 of 500 images apart
        assert abs(values["packed"][lr] - values["basic"][lr]) * 500 <= 2


@pytest.mark.parametrize(
    "pruner",
    [
        {"_target_": "optuna.pruners.HyperbandPruner", "min_resource": 1, "max_resource": 4},
        {"_target_": "optuna.pruners.SuccessiveHalvingPruner"},
        {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2},
    ],
    ids=["hyperband", "successive_halving", "median"],
)
def test_a_packs_reports_of_an_epoch_in_one_read_prune_as_optuna_alone(tmp_path, pruner):
    """A pack's members report an epoch as one round (pruning.one_round: the study read
    once, then kept up to date with the round's own writes). In two copies of one study,
    a pack of 4 trials reports 4 epochs, member by member, then another worker runs 2
    trials of its own, then a pack of 8 reports; after each epoch the sweep records the
    pruned and the finished through a storage of its own. In one copy the packs report
    through our links in rounds, in the other through Optuna's own trials, which read
    the database for each report. Both prune the same trials after the same epochs, and
    each round of ours read the study's trials once at most."""
    from fashion_sweep.sweeps import pruning

    reads: list[int] = []  # each round's reads of all the study's trials

    def counted(read):
        def counting(*args, **kwargs):
            reads[-1] += 1
            return read(*args, **kwargs)

        return counting

    draw = random.Random(0)
    values = [[draw.random() for _ in range(4)] for _ in range(14)]
    stopped = []
    for ours in (True, False):
        url = f"sqlite:///{tmp_path / f'{ours}.db'}"
        made = OmegaConf.create(pruner)
        # its trials report through Optuna's own API: the other worker's, and in the
        # second copy the packs' too
        sweep_side = optuna.create_study(
            study_name="s", storage=url, direction="maximize", pruner=hydra_instantiate(made)
        )
        pruned = {}
        for pack, by in ((range(4), ours), (range(4, 6), False), (range(6, 14), ours)):
            trials = {number: sweep_side.ask() for number in pack}
            links = {n: pruning.Pruning(url, "s", n, made) for n in pack if by}
            for view in pruning.RoundReads.made:  # the database's reads behind our links
                if not hasattr(view, "counted"):
                    view.counted = view.inner.get_all_trials = counted(view.inner.get_all_trials)
            running = list(pack)
            for epoch in range(1, 5):
                stop = []
                reads.append(0)
                with pruning.one_round() if by else contextlib.nullcontext():
                    for number in running:
                        value, last = values[number][epoch - 1], epoch == 4
                        if by:
                            stop += [number] * bool(links[number](epoch, value, last))
                        else:
                            trials[number].report(value, step=epoch)
                            stop += [number] * bool(not last and trials[number].should_prune())
                for number in stop:
                    pruned[number] = epoch
                    running.remove(number)
                    sweep_side.tell(number, state=TrialState.PRUNED)
            for number in running:
                sweep_side.tell(number, values[number][-1])
        stopped.append(pruned)
        pruning.forget()
    assert stopped[0] == stopped[1]
    assert 3 <= len(stopped[0]) < 14, stopped
    assert max(reads) == 1, reads  # Optuna alone: a read for each report
