"""Another team's Hydra app, as tests/test_any_app.py sweeps it with our sweeper: it
knows nothing of fashion_sweep but the one reporting call that lets its trials be
pruned (docs/any-app.md). With log_to_mlflow=true it logs to MLflow itself, as such
apps do."""

import contextlib
import time

import hydra
import optuna
from omegaconf import DictConfig

from fashion_sweep.sweeps.pruning import current_trial, report


@hydra.main(config_path="conf", config_name="config")
def fit(cfg: DictConfig) -> float | tuple[float, float] | None:
    if cfg.give_nothing:
        return None
    run = contextlib.nullcontext()
    if cfg.log_to_mlflow:
        import mlflow

        run = mlflow.start_run()
    with run:
        if cfg.log_to_mlflow:
            mlflow.log_param("steps", cfg.steps)
        loss = 0.0
        for step in range(1, cfg.steps + 1):
            loss = (cfg.x - 2) ** 2 + 1 / step  # each step closer to the trial's own floor
            time.sleep(cfg.step_seconds)
            if cfg.log_to_mlflow:
                mlflow.log_metric("loss", loss, step=step)
            if cfg.trial_api:  # Optuna's own calls, on the trial the sweep gives
                trial = current_trial()
                trial.report(loss, step)
                if trial.should_prune():
                    raise optuna.TrialPruned()
            else:
                report(loss, step)
    return loss if cfg.objectives == 1 else (loss, abs(cfg.x))


if __name__ == "__main__":
    fit()
