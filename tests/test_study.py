"""What defines a study, how its sampler is seeded, how outcomes are recorded."""

from __future__ import annotations

import functools

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from fashion_sweep.sweeps import study
from fashion_sweep.sweeps.sampler import PerTrialSeed
from fashion_sweep.sweeps.schedule import CUT_OFF, FAILURE

SPACE = {
    "optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1, log=True),
    "data.batch_size": optuna.distributions.CategoricalDistribution([32, 64, 128, 256]),
}


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def define(compose):
    """define(*overrides): the definition of the sweep `-m sweep=optuna *overrides`."""

    def _define(*overrides: str, space=SPACE, fixed=None) -> dict:
        cfg = compose("sweep=optuna", *overrides, hydra=True)
        sampler = cfg.hydra.sweeper.sampler
        # the sweep's fixed values: its task overrides, as the sweeper parses them
        fixed = {
            **{k: v for k, _, v in (o.partition("=") for o in overrides) if "hydra" not in k},
            **(fixed or {}),
        }
        return study.definition(cfg, space, fixed, sampler, ["val/accuracy"], ["maximize"])

    return _define


def test_a_study_is_defined_by_what_its_trials_compute(define):
    base = define()
    assert base["objective"] == "maximize val/accuracy"
    assert base["sampler"]["_target_"] == "optuna.samplers.TPESampler"
    assert base["sampler"]["seed"] == 0
    assert set(base["space"]) == set(SPACE)
    assert base["config"]["model.width"] == 512 and base["config"]["data.val_size"] == 10000
    assert "optimizer.lr" not in base["config"]  # searched, not fixed
    assert not [k for k in base["config"] if k.startswith("tracking.") or k == "data.root"]
    name = study.default_name(base)
    changed = [
        define("hydra.sweeper.sampler.seed=1"),
        define("hydra/sweeper/sampler=random"),
        define("model.width=64"),
        define("trainer.epochs=2"),
        define(space={"optimizer.lr": SPACE["optimizer.lr"]}, fixed={"data.batch_size": "64"}),
    ]
    assert len({name, *map(study.default_name, changed)}) == 1 + len(changed)
    # where and how it runs, and how many trials, leave the study as it is
    same = [
        define("data.root=/elsewhere", "tracking.uri=sqlite:///other.db", "trainer.device=cpu"),
        define("hydra.sweeper.n_trials=5", "hydra.sweeper.n_jobs=4", "trainer.log_interval=7"),
        define("hydra/launcher=joblib", "data.loader=torch"),
    ]
    assert {study.default_name(d) for d in same} == {name}
    added = define(fixed={"+mirror": "http://me:s3cret@example.invalid/x"})
    assert added["config"]["mirror"] == "http://me:***@example.invalid/x"  # kept in the study


def test_a_name_reused_for_another_sweep_is_refused_saying_what_differs(define):
    held = optuna.create_study(study_name="mine", direction="maximize")
    study.check_definition(held, define(), created=True)
    study.check_definition(held, define("trainer.device=cpu"), created=False)  # the same
    with pytest.raises(study.StudyError) as refused:
        study.check_definition(held, define("model.width=64"), created=False)
    assert str(refused.value) == (
        "hydra.sweeper.study_name=mine holds another sweep (config.model.width: 512 -> 64): "
        "run that sweep's command, or name a new study"
    )
    other = {**SPACE, "data.batch_size": optuna.distributions.CategoricalDistribution([16, 32])}
    with pytest.raises(study.StudyError, match=r"space.data.batch_size: .*64, 128.* -> .*16"):
        study.check_definition(held, define(space=other), created=False)


def test_workers_and_resumes_never_draw_the_same_sequence(tmp_path):
    """Two workers on one database each start the sampler with seed 0, as two processes
    do; each trial's draws still depend on its number alone."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    make = functools.partial(optuna.samplers.TPESampler, n_startup_trials=10)

    def worker():
        sampler = PerTrialSeed(make, seed=0)
        return optuna.create_study(
            study_name="s", storage=storage, sampler=sampler, load_if_exists=True
        )

    a, b = worker(), worker()
    drawn = [(w.ask(SPACE).params) for w in (a, b, a, b)]  # interleaved, as workers do
    assert len({tuple(p.values()) for p in drawn}) == 4
    alone = optuna.create_study(sampler=PerTrialSeed(make, seed=0))
    assert [alone.ask(SPACE).params for _ in range(4)] == drawn  # reproducible by number
    other = optuna.create_study(sampler=PerTrialSeed(make, seed=1))
    assert other.ask(SPACE).params != drawn[0]


def test_outcomes_are_recorded_once(tmp_path):
    held = optuna.create_study(direction="maximize")
    done, failed, late = held.ask(SPACE), held.ask(SPACE), held.ask(SPACE)
    assert study.record(held, done, 0.75, "run-a")
    assert study.record(held, failed, "ValueError: bad", "run-b")
    assert study.cut_off(held, late, "interrupted")
    assert not study.record(held, late, 0.5, "run-c")  # cut off first: stays so
    assert not study.cut_off(held, done, "interrupted")  # recorded first: stays so
    trials = held.trials
    assert (trials[0].state, trials[0].value) == (TrialState.COMPLETE, 0.75)
    assert trials[0].user_attrs["mlflow_run_id"] == "run-a"
    assert trials[1].state == TrialState.FAIL
    assert trials[1].user_attrs[FAILURE] == "ValueError: bad"
    assert trials[2].state == TrialState.FAIL and trials[2].user_attrs[CUT_OFF] == "interrupted"


def test_a_result_that_comes_after_its_trial_was_cut_off_changes_no_record(
    compose, store, tmp_path
):
    """A trial's process that outlived its sweep worker ends its run FINISHED just after
    a resume cut the trial off: the study keeps the cut-off, the run ends KILLED as the
    resume ended it, and nothing ends a KILLED run FINISHED or gives it a model."""
    from hydra.core.utils import JobReturn, JobStatus
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from fashion_sweep.run import Objective
    from fashion_sweep.sweeps.callbacks import ReportToStudy
    from fashion_sweep.sweeps.workers import DEAD_WORKER
    from fashion_sweep.tracking import runs

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    held = optuna.create_study(study_name="late", storage=storage, direction="maximize")
    cut, recorded = held.ask(SPACE), held.ask(SPACE)
    client = MlflowClient(store)

    def job(number: int) -> tuple:
        cfg = compose(
            "sweep=optuna",
            f"hydra.sweeper.storage={storage}",
            "tracking.study=late",
            f"tracking.trial={number}",
            f"tracking.uri={store}",
            hydra=True,
        )
        task = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
        resolved = OmegaConf.to_container(task, resolve=True, enum_to_str=True)
        run_id = runs.open_run(resolved, {}, [])
        runs.log_metrics(run_id, {"val/accuracy": 0.5}, 1)
        returned = JobReturn(status=JobStatus.COMPLETED)
        returned.return_value = Objective(0.5, run_id)
        return cfg, run_id, returned

    cfg, run_id, returned = job(cut.number)
    assert study.cut_off(held, cut, "crashed")  # the resume, while the trial trains on
    runs.end_run(run_id, "FINISHED")  # its last epoch, a moment later
    ReportToStudy().on_job_end(cfg, returned)  # its result: too late
    after = client.get_run(run_id)
    assert (after.info.status, after.data.tags.get("failure_reason")) == ("KILLED", DEAD_WORKER)
    runs.end_run(run_id, "FINISHED")  # anyone's, later still: KILLED it stays
    runs.log_model(run_id, {})
    assert client.get_run(run_id).info.status == "KILLED"
    assert not client.list_artifacts(run_id, "model.pth")
    assert held.trials[cut.number].state == TrialState.FAIL
    assert held.trials[cut.number].user_attrs[CUT_OFF] == "crashed"

    # a resume that found the run FINISHED recorded it first, as its run ended: it stays
    cfg, run_id, returned = job(recorded.number)
    runs.end_run(run_id, "FINISHED")
    assert study.record(held, recorded, 0.5, run_id)
    ReportToStudy().on_job_end(cfg, returned)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert held.trials[recorded.number].state == TrialState.COMPLETE


def _reads_per_ask(tmp_path, running: int) -> tuple[int, list[float]]:
    """Study rows bound to the statements of one round of 4 asks, with `running`
    trials running and 20 complete (TPE past its start-up); the asked lrs."""
    database = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/r{running}.db")
    where = optuna.storages.get_storage(database)  # as opening.py opens it
    sampler = PerTrialSeed(functools.partial(optuna.samplers.TPESampler, n_startup_trials=10), 0)
    held = optuna.create_study(storage=where, sampler=sampler, direction="maximize")
    for n in range(20):
        held.tell(held.ask(SPACE), n / 20)
    for _ in range(running):
        held.ask(SPACE)
    asking, snapshot = study.for_asking(held, where)
    bound = []

    def count(conn, cursor, statement, parameters, context, executemany):
        bound.append(len(parameters) if parameters else 0)

    sqlalchemy.event.listen(database.engine, "before_cursor_execute", count)
    with snapshot.one_read(held.get_trials(deepcopy=False)):
        bound.clear()  # the loop's own read is before the round
        asked = [asking.ask(SPACE) for _ in range(4)]
        lrs = [t.params["optimizer.lr"] for t in asking.get_trials(deepcopy=False)[-4:]]
    sqlalchemy.event.remove(database.engine, "before_cursor_execute", count)
    assert lrs == [t.params["optimizer.lr"] for t in asked]  # the round sees its own trials
    return sum(bound), lrs


def test_a_round_of_asks_reads_as_much_with_64_trials_running_as_with_4(tmp_path):
    """What an ask reads does not grow with the trials running (snapshot.py): a worker
    running 256 trials asked 82 ms a trial, one running 4, 21 ms."""
    few, few_lrs = _reads_per_ask(tmp_path, 4)
    many, many_lrs = _reads_per_ask(tmp_path, 64)
    assert few == many
    assert len(set(few_lrs + many_lrs)) == 8  # TPE drew afresh for each trial


def test_a_round_takes_what_was_queued_and_sees_what_others_asked_at_its_end(tmp_path):
    where = optuna.storages.get_storage(f"sqlite:///{tmp_path}/q.db")
    held = optuna.create_study(storage=where, direction="maximize")
    held.enqueue_trial({"optimizer.lr": 0.1, "data.batch_size": 32})  # a retry, by the loop
    asking, snapshot = study.for_asking(held, where)
    with snapshot.one_read(held.get_trials(deepcopy=False)):
        retry = asking.ask(SPACE)
        other = held.ask(SPACE)  # another worker, in the same round
        asking.enqueue_trial({"optimizer.lr": 0.5, "data.batch_size": 64})
        mine = asking.ask(SPACE)
        seen = [t.number for t in asking.get_trials(deepcopy=False)]
        study_id = where.get_study_id_from_name(held.study_name)
        caught_up = [(t.number, t.params) for t in snapshot.caught_up(study_id, SPACE)]
    assert retry.params == {"optimizer.lr": 0.1, "data.batch_size": 32}
    assert mine.params == {"optimizer.lr": 0.5, "data.batch_size": 64}
    assert other.number not in seen and mine.number in seen
    assert caught_up == [(0, retry.params), (1, other.params), (2, mine.params)]
    assert [t.number for t in asking.get_trials(deepcopy=False)] == [0, 1, 2]  # after: all


def test_a_round_ends_with_what_another_worker_was_still_drawing_when_it_began(tmp_path):
    """Another worker's trial asked but not yet given its values when the round read
    the study is read again at the round's end, so that a repeat of it is seen."""
    where = optuna.storages.get_storage(f"sqlite:///{tmp_path}/d.db")
    held = optuna.create_study(storage=where, direction="maximize")
    drawing = held.ask()  # another worker's, between its ask and its values
    asking, snapshot = study.for_asking(held, where)
    with snapshot.one_read(held.get_trials(deepcopy=False)):
        drawing.suggest_float("optimizer.lr", 1e-4, 1, log=True)
        drawing.suggest_categorical("data.batch_size", [32, 64, 128, 256])
        asking.ask(SPACE)
        study_id = where.get_study_id_from_name(held.study_name)
        caught_up = snapshot.caught_up(study_id, SPACE)
    assert caught_up[0].params == drawing.params


def test_a_trial_a_round_makes_or_takes_is_its_workers_before_its_values_are_drawn(tmp_path):
    """A worker killed while the sampler draws leaves a trial a resume knows to be a dead
    worker's (workers.alive), not one without a worker, waited for its grace period."""
    where = optuna.storages.get_storage(f"sqlite:///{tmp_path}/w.db")
    held = optuna.create_study(storage=where, direction="maximize")
    held.enqueue_trial({"optimizer.lr": 0.1, "data.batch_size": 32})
    worker = {"id": "host:1:abc", "host": "host", "pid": 1}
    asking, snapshot = study.for_asking(held, where, worker)
    with snapshot.one_read(held.get_trials(deepcopy=False)):
        taken = asking.ask()  # the queued trial, before any value is drawn
        made = asking.ask()  # a new one
    for trial in (taken, made):
        assert held.trials[trial.number].user_attrs["worker"] == worker


def test_a_trial_a_round_queues_is_not_its_workers_until_it_takes_it(tmp_path):
    """A trial a worker queues (a retry, a confirmation run) belongs to whichever worker
    takes it: the queuing worker, interrupted, must not cut it off as its own."""
    where = optuna.storages.get_storage(f"sqlite:///{tmp_path}/w.db")
    held = optuna.create_study(storage=where, direction="maximize")
    worker = {"id": "host:1:abc", "host": "host", "pid": 1}
    asking, snapshot = study.for_asking(held, where, worker)
    with snapshot.one_read(held.get_trials(deepcopy=False)):
        asking.enqueue_trial({"optimizer.lr": 0.1})
    (queued,) = held.trials
    assert snapshot.taken == [] and "worker" not in queued.user_attrs
