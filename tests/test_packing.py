"""`hydra/launcher=packed` (launchers/packed.py): real sweeps (in this process) whose
trials train together, each still an ordinary trial in Optuna, in MLflow and on disk."""

from __future__ import annotations

import re
import signal
import threading
import time

import pytest
import torch
from hydra import initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf, open_dict
from optuna.trial import TrialState

from fashion_sweep.core import stacked
from fashion_sweep.core.model import NeuralNetwork
from fashion_sweep.launchers.packed import by_batch_size, pack_key, task_config
from fashion_sweep.tracking.writer import Writer
from tests.conftest import CONF, trial_log
from tests.test_sweep import results, runs, study

# The preset's batch sizes: the sweep asks 3 trials at a time, and with
# mix_batch_sizes the 3 go into one pack (each batch size a multiple of the smallest:
# micro-batches where they differ).
# Learning rates up to 0.1: above that, SGD here is chaotic, and rounding-sized noise in
# the gradients alone moves an epoch's val/accuracy by points (tests/conftest.py).
SPACE = ["data.batch_size=choice(32,64,128,256)", "optimizer.lr=tag(log,interval(1e-4,0.1))"]
SPACE += ["hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=3"]


@pytest.mark.slow
@pytest.mark.equivalence
def test_packed_trials_are_the_trials_the_basic_launcher_runs(sweep, tmp_path):
    outcomes = {}
    for launcher in ("basic", "packed"):
        cwd = tmp_path / launcher
        cwd.mkdir()
        args = [*SPACE, f"hydra/launcher={launcher}", "hydra.sweeper.study_name=s"]
        args += ["hydra.launcher.mix_batch_sizes=true"] if launcher == "packed" else []
        done = sweep(*args, cwd=cwd)
        assert done.returncode == 0, done.stderr[-3000:]
        trials = study(cwd, "s").trials
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
        outcomes[launcher] = {t.number: (t.params, t.value) for t in trials}
        client, (parent,), children = runs(cwd)
        assert sorted(int(c.data.tags["trial"]) for c in children) == list(range(6))
        for child in children:  # each an ordinary run: status, metrics, files, model
            assert child.info.status == "FINISHED"
            assert child.data.metrics["val/accuracy"] == pytest.approx(
                outcomes[launcher][int(child.data.tags["trial"])][1]
            )
            files = {a.path for a in client.list_artifacts(child.info.run_id)}
            assert files == {"config.yaml", "overrides.yaml", "model.pth"}
        assert parent.info.status == "FINISHED"
        assert len(list(cwd.glob("multirun/*/*/[0-5]/.hydra/config.yaml"))) == 6
    # the last loop was the packed sweep's: each member's log has its pack's lines; the
    # pack is continuous: as trials 0-2 ended, 3-5 joined it
    assert "Packed 3 trials" in trial_log(cwd, 0)
    assert "Trials 3, 4, 5 join the pack, each from its epoch 1" in trial_log(cwd, 5)
    assert "join the pack" not in trial_log(cwd, 0)  # its log ended with its trial
    assert "Packed" not in done.stdout  # the console has the trials' lines
    said = re.findall(r"^\[(\d)/6\] trial (\d) lr=\S+ bs=\d+  val/accuracy ", done.stdout, re.M)
    assert sorted(said) == [(str(n + 1), str(n)) for n in range(6)], done.stdout
    path = client.download_artifacts(children[0].info.run_id, "model.pth", str(tmp_path))
    NeuralNetwork().load_state_dict(torch.load(path))  # a NeuralNetwork's state_dict
    sizes = [
        {outcomes["packed"][n][0]["data.batch_size"] for n in pack}
        for pack in (range(3), range(3, 6))
    ]
    assert max(len(s) for s in sizes) > 1, sizes  # a pack of several batch sizes
    for number, (params, value) in outcomes["basic"].items():
        packed_params, packed_value = outcomes["packed"][number]
        assert packed_params == params  # the sampler asked for the same trials
        assert abs(packed_value - value) * 500 <= 2  # val/accuracy: at most 2 of 500 images
    assert results(tmp_path / "packed")["best_params"] == results(tmp_path / "basic")["best_params"]


@pytest.mark.slow
def test_a_diverging_trial_fails_alone_in_its_pack(sweep, tmp_path):
    done = sweep(
        "hydra/launcher=packed",
        "hydra/sweeper/sampler=grid",
        "optimizer.lr=choice(0.05,10000.0,0.1)",
        "data.batch_size=64",
        "trainer.log_interval=2",
        "hydra.sweeper.n_jobs=3",
        "hydra.sweeper.study_name=bad",
        "hydra.sweeper.max_failure_rate=0.5",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Packed 3 trials" in trial_log(tmp_path, 0)
    trials = {t.params["optimizer.lr"]: t for t in study(tmp_path, "bad").trials}
    assert trials[10000.0].state == TrialState.FAIL
    reason = "DivergedError: train/loss is nan at batch "  # its type named once
    assert trials[10000.0].user_attrs["failure_reason"].startswith(reason)
    assert trials[0.05].state == trials[0.1].state == TrialState.COMPLETE
    _, (parent,), children = runs(tmp_path)
    status = {c.data.params["optimizer.lr"]: c for c in children}
    assert status["10000.0"].info.status == "FAILED"
    assert status["10000.0"].data.tags["failure_reason"].startswith(reason)
    assert status["0.05"].info.status == status["0.1"].info.status == "FINISHED"
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_members_this_device_cannot_train_fail_before_their_runs_and_no_pack_trains(
    sweep, tmp_path
):
    """capturable Adam on the CPU, which torch refuses only at the first step: each job's
    check() takes that step, so each trial fails with torch's reason before it has an
    MLflow run, and no pack is trained for them."""
    done = sweep(
        "hydra/launcher=packed",
        "hydra/sweeper/sampler=grid",
        "optimizer.lr=choice(0.1,0.2,0.3)",
        "data.batch_size=64",
        "optimizer=adam",
        "+optimizer.capturable=true",
        "trainer.device=cpu",  # where torch refuses it
        "hydra.sweeper.n_jobs=3",
        "hydra.sweeper.study_name=x",
    )
    assert done.returncode == 1  # more failures than max_failure_rate allows
    assert "Packed" not in done.stdout + trial_log(tmp_path, 0)
    trials = study(tmp_path, "x").trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    for trial in trials:
        reason = trial.user_attrs["failure_reason"]
        assert reason.startswith("ConfigError: optimizer: If capturable=True"), reason
        assert reason.endswith("(at a first step on cpu)")
    _, _, children = runs(tmp_path)
    assert children == []


@pytest.mark.slow
def test_an_error_of_the_packs_fails_every_member_once(sweep, tmp_path, monkeypatch):
    """An error of the pack's, not of one member's: every member fails with it, each with
    its one MLflow run FAILED, and the pack is not trained again for each of its jobs.
    The error is injected where a device would raise it (a CUDA out-of-memory in the
    pack's step, which no CPU here can raise)."""
    steps = []

    def out_of_memory(*args, **kwargs):
        steps.append(1)
        raise RuntimeError("CUDA out of memory (injected into the pack's step)")

    monkeypatch.setattr(stacked.Pack, "step", out_of_memory)
    args = ["hydra/launcher=packed", "hydra/sweeper/sampler=grid"]
    args += ["optimizer.lr=choice(0.1,0.2,0.3)", "data.batch_size=64"]
    done = sweep(*args, "hydra.sweeper.n_jobs=3", "hydra.sweeper.study_name=x")
    assert done.returncode == 1, done.stderr[-3000:]  # more failures than the sweep allows
    assert trial_log(tmp_path, 0).count("Packed 3 trials") == 1 and len(steps) == 1
    assert "CUDA out of memory (injected" in trial_log(tmp_path, 2)  # its traceback
    trials = study(tmp_path, "x").trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert all("CUDA out of memory" in t.user_attrs["failure_reason"] for t in trials)
    _, _, children = runs(tmp_path)
    assert sorted(int(c.data.tags["trial"]) for c in children) == [0, 1, 2]  # one run each
    assert {c.info.status for c in children} == {"FAILED"}
    assert all("CUDA out of memory" in c.data.tags["failure_reason"] for c in children)


def test_what_a_pack_must_share(compose):
    """Trials that differ only in what stays per member (the optimizer's arguments, the
    seed, the loader's workers) share a pack; what changes the program does not. With
    mix_batch_sizes, the batch size stays per member too, but for a captured step."""
    base = pack_key(compose("optimizer.lr=0.1"))
    assert base is not None
    same = ["optimizer.lr=0.3", "optimizer.momentum=0.9", "trainer.seed=7", "data.num_workers=2"]
    for override in same:
        assert pack_key(compose(override)) == base, override
    mixed = pack_key(compose("optimizer.lr=0.1"), mix_batch_sizes=True)
    assert pack_key(compose("data.batch_size=32"), mix_batch_sizes=True) == mixed
    other = ["model.width=256", "optimizer=adam", "trainer.epochs=3", "data.train_size=640"]
    other += ["data.batch_size=32"]
    other += ["trainer.cuda_graph=true"]  # a captured pack and an eager one: two programs
    for override in other:
        assert pack_key(compose(override)) not in (base, None), override
    graph = pack_key(compose("trainer.cuda_graph=true", "data.batch_size=32"), True)
    assert graph != pack_key(compose("trainer.cuda_graph=true"), True)
    assert pack_key(compose("data.loader=torch")) is None  # the tutorial's path: alone
    assert pack_key(compose("optimizer._target_=torch.optim.LBFGS")) is None


def test_batch_sizes_share_a_pack_where_each_is_a_multiple_of_its_smallest(compose):
    sizes = [256, 64, 48, 32, 96, 128, 40]
    jobs = []
    for num, size in enumerate(sizes):
        job = compose(f"data.batch_size={size}")
        with open_dict(job):
            job.hydra = {"job": {"num": num}}
        jobs.append(job)
    packs = [[job.data.batch_size for job in pack] for pack in by_batch_size(jobs)]
    # each pack in job order; 48 and 40 are not multiples of 32 (nor 48 of 40)
    assert sorted(packs) == sorted([[256, 64, 32, 96, 128], [48], [40]])
    assert pack_key(compose("data.loader=torch")) is None  # the tutorial's path: alone
    assert pack_key(compose("optimizer._target_=torch.optim.LBFGS")) is None


def test_each_member_gets_the_config_run_job_gives_a_task(compose, tmp_path, monkeypatch):
    """A pack's members are trained from their job's config less its hydra node: the
    same values, interpolations, flags and resolved values as the task config that
    Hydra's own run_job hands a task function (captured from a real run_job)."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import run_job
    from hydra.types import HydraContext

    monkeypatch.chdir(tmp_path)  # run_job writes the job's .hydra/ folder
    overrides = ["sweep=optuna", "optimizer.lr=0.3", "+tracking.tag=t${now:%f}"]
    config = compose(*overrides, "tracking.trial=0", hydra=True)
    stamp = config.tracking.tag  # resolved once for the job, as its own run would see it
    time.sleep(0.01)
    cfg = task_config(config)
    given = []
    with initialize_config_dir(config_dir=str(CONF)):
        context = HydraContext(GlobalHydra.instance().config_loader(), Callbacks(config))
        job = run_job(given.append, config, "hydra.sweep.dir", "hydra.sweep.subdir", context)
    assert job.status.name == "COMPLETED" and len(given) == 1
    (expected,) = given
    assert "hydra" in config and "hydra" not in cfg and "hydra" not in expected
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(expected)  # unresolved
    assert OmegaConf.to_container(cfg, resolve=True) == OmegaConf.to_container(
        expected, resolve=True
    )
    assert OmegaConf.is_struct(cfg) and OmegaConf.is_struct(expected)
    assert OmegaConf.is_readonly(cfg) == OmegaConf.is_readonly(expected)
    assert cfg.tracking.tag == expected.tracking.tag == stamp  # the job's own resolved values
    with pytest.raises(AttributeError):
        cfg.optimizer.lrr  # noqa: B018 (a key that is not there is an error, as in the task)
    cfg.optimizer.lr = 0.5  # a copy: the job's own config is untouched
    assert config.optimizer.lr == 0.3


def _run(writes, compose, store, name):
    cfg = compose(f"tracking.uri={store}", f"tracking.run_name={name}")
    return writes.open_run(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), {}, [])


def test_a_packs_writes_are_made_in_order_beside_the_caller(compose, store):
    """tracking/writer.py on a real store: the caller goes on while the writes wait;
    a failed write breaks its own run only, which then ends FAILED with that error."""
    writes, gate, order = Writer(), threading.Event(), []
    good, bad = _run(writes, compose, store, "good"), _run(writes, compose, store, "bad")
    writes.write(good, lambda run: gate.wait())
    writes.write(good, lambda run, n: order.append(n), 1)
    assert order == [] and writes.error(good) is None  # the caller was not held

    def refused(run):
        raise RuntimeError("artifact store refused")

    writes.write(bad, refused)
    writes.write(bad, lambda run, n: order.append(n), 2)  # skipped: its run is broken
    writes.write(good, lambda run, n: order.append(n), 3)
    writes.end_run(good, "FINISHED")
    writes.end_run(bad, "FINISHED")
    gate.set()
    writes.flush()
    assert writes.error(good) is None, writes.error(good)
    assert order == [1, 3]
    assert "artifact store refused" in str(writes.error(bad))
    client = MlflowClient(store)
    assert client.get_run(good.result()).info.status == "FINISHED"
    broken = client.get_run(bad.result())
    assert broken.info.status == "FAILED"
    assert "artifact store refused" in broken.data.tags["failure_reason"]
    writes.close()


def test_a_second_interruption_abandons_the_queued_writes_without_a_hang(compose, store):
    """A Ctrl-C while the writer waits on a store that does not answer: the writes not
    yet begun are dropped, and the one under way is all that is left to wait for."""
    writes, gate, started, order = Writer(), threading.Event(), threading.Event(), []
    run = _run(writes, compose, store, "r")
    writes.write(run, lambda run: (started.set(), gate.wait()))  # a store that does not answer
    writes.write(run, lambda run: order.append("queued"))

    def ctrl_c() -> None:  # at the main thread, where Python runs a signal's handler
        started.wait(30)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    threading.Thread(target=ctrl_c, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        writes.flush(abandon=True)
    gate.set()  # the store answers the write it was making
    writes.flush()  # nothing else is left to wait for
    writes.close()
    assert order == []  # the queued write was dropped


@pytest.mark.slow
def test_a_sweep_that_fails_while_a_continuous_pack_trains_cuts_the_members_off(sweep, tmp_path):
    """The sweep fails (too many failures) at a continuous pack's refill, while a healthy
    member is mid-way: that member's run ends KILLED and its trial is cut off (it runs
    again on a resume), not failed as if it had; the command exits 1 in one line."""
    done = sweep(
        "hydra/launcher=packed",
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.sampler.seed=1",  # the grid's order: 0.1, then 20000.0, 10000.0
        "optimizer.lr=choice(0.1,10000.0,20000.0)",
        "data.batch_size=64",
        "trainer.epochs=3",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.max_failure_rate=0.25",  # not one failure of 3
        "hydra.sweeper.study_name=stops",
    )
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 trials failed, more than"), done.stderr[-2000:]
    trials = {t.params["optimizer.lr"]: t for t in study(tmp_path, "stops").trials}
    assert trials[20000.0].state == TrialState.FAIL
    assert "DivergedError" in trials[20000.0].user_attrs["failure_reason"]
    healthy = trials[0.1]
    assert healthy.state == TrialState.FAIL and "failure_reason" not in healthy.user_attrs
    assert healthy.user_attrs["interrupted"]  # cut off: a resume runs it again
    _, (parent,), children = runs(tmp_path)
    status = {c.data.params["optimizer.lr"]: c.info.status for c in children}
    assert status == {"0.1": "KILLED", "20000.0": "FAILED"}
    assert parent.info.status == "FAILED"


@pytest.mark.slow
def test_a_refused_member_gives_its_place_in_a_continuous_pack_back_at_once(sweep, tmp_path):
    """A trial whose values the check refuses as its pack forms fails at once, and the
    next trial takes its place before the pack trains; a trial that joins later is
    tagged with the pack it joined."""
    done = sweep(
        "hydra/launcher=packed",
        "hydra/sweeper/sampler=grid",  # the grid's order: -2.0 first, then 0.02, 0.05, ...
        "optimizer.lr=choice(0.1,0.05,0.02,0.01,-1.0,-2.0)",
        "data.batch_size=64",
        "trainer.epochs=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.max_failure_rate=1",
        "hydra.sweeper.study_name=refused",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trials = study(tmp_path, "refused").trials
    assert trials[0].params["optimizer.lr"] == -2.0 and trials[0].state == TrialState.FAIL
    assert "Packed 2 trials: 1, 2" in trial_log(tmp_path, 1)  # 2 took 0's place at once
    assert (
        trial_log(tmp_path, 0)
        .strip()
        .splitlines()[-1]
        .startswith("Job failed: ConfigError: optimizer.lr must be a finite number > 0, got -2.0")
    )
    _, _, children = runs(tmp_path)
    packs = {int(c.data.tags["trial"]): c.data.tags["pack"] for c in children}
    assert packs[1] == packs[2] == "2 trials: 1, 2"
    assert packs[3] == packs[4] == "2 trials: 3, 4"  # joined as 1 and 2 ended
