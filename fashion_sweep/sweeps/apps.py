"""What a sweep asks of the app whose trials it runs, named by `hydra.sweeper.app`.

`App` (hydra.sweeper.app=null) is any Hydra app, as hydra-optuna-sweeper runs it: a
trial's value is what its task function returns (one number, or one per direction),
nothing is checked before the first trial, and no MLflow run is made. Each trial learns
its place in the study from its environment (FASHION_SWEEP_STUDY, FASHION_SWEEP_TRIAL,
set through hydra.job.env_set), which `fashion_sweep.sweeps.pruning.report` reads to
prune. `MlflowApp` is another app that logs to MLflow itself, opted in to the runs.
`FashionSweepApp` (conf/sweep/optuna.yaml) is this project's app: its checks before
the first trial, the MLflow parent run and one child run per trial (the trial's place
passed as tracking.* overrides), its seed for the confirmation stage, its model
registered. docs/any-app.md says what another app gets and how to opt in.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from fashion_sweep.sweeps.settings import SweepError

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from fashion_sweep.sweeps.compose import ComposeOnce
    from fashion_sweep.sweeps.space import Space

STUDY, TRIAL = "FASHION_SWEEP_STUDY", "FASHION_SWEEP_TRIAL"
CONFIRMS = "FASHION_SWEEP_CONFIRMS"  # a confirmation run's search trial: never pruned
JOB_NUM = "${hydra.job.num}"  # Hydra's hydra.sweep.subdir
# the trial's MLflow run, which AppTask hands on as MLFLOW_RUN_ID (MlflowApp)
RUN_ID = "FASHION_SWEEP_MLFLOW_RUN_ID"


class App:
    """Any Hydra app."""

    # whether each trial's output goes to its folder's log (hydra.sweeper.trial_output=
    # file); any app: its output is its own, on the console
    logs_trials = False
    # whether the best trial's run holds a model fashion_sweep.predict loads, registered
    # as tracking.registered_model
    has_model = False

    def __init__(self, config: DictConfig) -> None:
        self.config = config

    @property
    def tracking_uri(self) -> str | None:
        """MLflow's store for the sweep's parent run and its trials' runs; None: no runs."""
        return None

    @property
    def experiment(self) -> str:
        """The MLflow experiment of the parent and trial runs."""
        return "Default"

    def metrics(self) -> list[str] | None:
        """The names of a trial's values, one per direction, each checked against its
        direction; None: as many values as directions, named `value` (`value_0`, ...)."""
        return None

    def direction(self, metric: str) -> str | None:
        """The direction `metric` needs, which hydra.sweeper.direction must give; None:
        any."""
        return None

    def seed_key(self, confirm: DictConfig | None) -> str | None:
        """The key a confirmation run's new seed is set on (hydra.sweeper.confirm.seed_key)."""
        return confirm.get("seed_key") if confirm is not None else None

    def seed(self, key: str) -> Any:
        """The seed the app's config gives `key`: no confirmation run takes it."""
        return OmegaConf.select(self.config, key)

    def check(self, compose: ComposeOnce, searched: Space) -> None:
        """A trial's config checked before any store opens; any app: only that it asks
        for nothing this project's app alone has."""
        launcher = str(self.config.hydra.launcher.get("_target_", ""))
        if launcher.startswith("fashion_sweep.launchers."):
            raise SweepError(
                "hydra/launcher=packed trains fashion_sweep.train's model in packs: it runs "
                "no other app's trials"
            )

    def overrides(
        self, study: str, trial: optuna.Trial, parent: str | None, label: str, confirms: int | None
    ) -> list[str]:
        """What a trial's job gets besides its values: its place in the study; and where
        the app keeps Hydra's folder per job (hydra.sweep.subdir=${hydra.job.num}, which
        each run of a resumed study counts from 0 again), the trial's number as its
        folder, unique in the study."""
        subdir = OmegaConf.to_container(self.config.hydra.sweep, resolve=False)["subdir"]
        return [
            f"++hydra.job.env_set.{STUDY}='{study}'",
            f"++hydra.job.env_set.{TRIAL}='{trial.number}'",
            *([f"++hydra.job.env_set.{CONFIRMS}='{confirms}'"] if confirms is not None else []),
            *([f"hydra.sweep.subdir={trial.number}"] if subdir == JOB_NUM else []),
        ]

    def ended(self, trial: FrozenTrial, metrics: list[str]) -> None:
        """Told of each of this worker's trials as the study records its end."""


class MlflowApp(App):
    """Any Hydra app that logs to MLflow itself, opted in to the parent and child runs
    (hydra.sweeper.app=fashion_sweep.sweeps.apps.MlflowApp): the sweep makes each
    trial's run under the study's parent run before its job starts, with the trial's
    params, and the job gets its id as MLFLOW_RUN_ID, so the app's mlflow.start_run()
    continues that run. As the trial ends, the sweep logs its value(s) there, and ends
    the run as the trial ended if the app did not. The store and experiment are
    MLFLOW_TRACKING_URI's and MLFLOW_EXPERIMENT_NAME's (sqlite:///mlflow.db in the
    folder the sweep starts in, Default); a subclass may set others."""

    @property
    def tracking_uri(self) -> str | None:
        return os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")

    @property
    def experiment(self) -> str:
        return os.environ.get("MLFLOW_EXPERIMENT_NAME", "Default")

    def overrides(
        self, study: str, trial: optuna.Trial, parent: str | None, label: str, confirms: int | None
    ) -> list[str]:
        from fashion_sweep.tracking import stores, sweep_runs

        uri = stores.absolute(str(self.tracking_uri))  # a job may run in its own folder
        run_id = sweep_runs.open_trial_run(uri, parent, trial.number, label, trial.params)
        trial.set_user_attr("mlflow_run_id", run_id)
        return [
            *super().overrides(study, trial, parent, label, confirms),
            f"++hydra.job.env_set.{RUN_ID}='{run_id}'",
            f"++hydra.job.env_set.MLFLOW_TRACKING_URI='{uri}'",
        ]

    def ended(self, trial: FrozenTrial, metrics: list[str]) -> None:
        from optuna.trial import TrialState

        from fashion_sweep.sweeps.schedule import CUT_OFF, FAILURE, PRUNED
        from fashion_sweep.tracking import sweep_runs

        run_id, attrs = trial.user_attrs.get("mlflow_run_id"), trial.user_attrs
        if not run_id or CUT_OFF in attrs or not trial.state.is_finished():
            return  # a cut-off trial's run is the sweep's to end (KILLED)
        complete = trial.state == TrialState.COMPLETE
        values = dict(zip(metrics, trial.values, strict=True)) if complete else {}
        pruned = attrs.get(PRUNED, trial.last_step) if trial.state == TrialState.PRUNED else None
        failed = attrs.get(FAILURE, "failed") if trial.state == TrialState.FAIL else None
        uri = str(self.tracking_uri)
        sweep_runs.end_trial_run(uri, run_id, values, trial.last_step or 0, pruned, failed)


class FashionSweepApp(App):
    """fashion_sweep.train: config.optimized_metric, config.tracking, trainer.seed."""

    logs_trials = True
    has_model = True

    @property
    def tracking_uri(self) -> str | None:
        return str(self.config.tracking.uri)

    @property
    def experiment(self) -> str:
        return str(self.config.tracking.experiment)

    def metrics(self) -> list[str] | None:
        metric = self.config.optimized_metric
        return [metric] if isinstance(metric, str) else list(metric)

    def direction(self, metric: str) -> str | None:
        return "minimize" if metric.endswith(("loss", "seconds")) else "maximize"

    def seed_key(self, confirm: DictConfig | None) -> str | None:
        return super().seed_key(confirm) or "trainer.seed"

    def check(self, compose: ComposeOnce, searched: Space) -> None:
        from fashion_sweep.sweeps.opening import preflight

        preflight(self.config, compose, searched)

    def overrides(
        self, study: str, trial: optuna.Trial, parent: str | None, label: str, confirms: int | None
    ) -> list[str]:
        return [
            f"tracking.parent_run_id='{parent}'",
            f"tracking.trial={trial.number}",
            f"tracking.study='{study}'",
            f"tracking.run_name='{label}'",
            *([f"tracking.confirms={confirms}"] if confirms is not None else []),
        ]


class AppTask:
    """Another app's task function, as a sweep of ours runs each trial of it:
    - in a process a launcher started (joblib, submitit), it stops, its process exiting,
      when the sweep worker that launched it dies (workers.watched), as this project's
      trials do (fashion_sweep.train does so itself);
    - for an MlflowApp, with MLFLOW_RUN_ID set to its trial's run (from RUN_ID), so that
      the app's mlflow.start_run() continues it. Not through hydra.job.env_set:
      mlflow.end_run() deletes MLFLOW_RUN_ID, and Hydra's restore of the environment
      then fails on it."""

    def __init__(self, task_function: Any) -> None:
        self.task_function = task_function

    def __call__(self, cfg: DictConfig) -> Any:
        from fashion_sweep import signals
        from fashion_sweep.sweeps.workers import watched

        run_id = os.environ.get(RUN_ID)
        before = os.environ.get("MLFLOW_RUN_ID")
        if run_id is not None:
            os.environ["MLFLOW_RUN_ID"] = run_id
        try:
            with signals.interrupts(), watched():
                returned = self.task_function(cfg)
            _record(returned)  # now: a signal after this job cannot undo its trial
            return returned
        finally:
            if run_id is not None:
                os.environ.pop("MLFLOW_RUN_ID", None)
                if before is not None:
                    os.environ["MLFLOW_RUN_ID"] = before


def _record(returned: Any) -> None:
    """A job's value recorded in its trial from the job's own process, as it returns,
    where the study is in a database or in this process (the sweep's, basic launcher)."""
    from hydra.core.hydra_config import HydraConfig

    from fashion_sweep.sweeps import study

    name, number = os.environ.get(STUDY), os.environ.get(TRIAL)
    if name is None or number is None or not HydraConfig.initialized():
        return
    url = HydraConfig.get().sweeper.get("storage")
    if not study.opened_here(url):
        return  # another process's database: the sweep records it, as before
    found = study.trial(url, name, int(number))
    if found is not None:
        study.record(*found, returned, None)


def ours(name: str | None) -> bool:
    """Whether hydra.sweeper.app names this project's app, whose entry point
    (fashion_sweep.train) handles signals and its trials' processes itself."""
    try:
        chosen = get_class(name) if name else App
    except Exception:
        return False  # make() says what is wrong, as the sweep opens
    return isinstance(chosen, type) and issubclass(chosen, FashionSweepApp)


def task(name: str | None, task_function: Any) -> Any:
    """The task function the launcher runs for the app `name` names: this project's as
    it is, another app's as an AppTask."""
    return task_function if ours(name) else AppTask(task_function)


def make(name: str | None, config: DictConfig) -> App:
    """The app hydra.sweeper.app names (a class path), or any Hydra app for null."""
    if not name:
        return App(config)
    try:
        chosen = get_class(name)
    except Exception as error:
        raise SweepError(f"hydra.sweeper.app={name}: {str(error).splitlines()[0]}") from None
    if not (isinstance(chosen, type) and issubclass(chosen, App)):
        raise SweepError(f"hydra.sweeper.app={name} is no fashion_sweep.sweeps.apps.App")
    return chosen(config)
