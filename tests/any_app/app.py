"""Another team's Hydra app, as tests/test_any_app.py sweeps it with our sweeper: it
knows nothing of fashion_sweep but the one reporting call that lets its trials be
pruned (docs/any-app.md)."""

import hydra
from omegaconf import DictConfig

from fashion_sweep.sweeps.pruning import report


@hydra.main(config_path="conf", config_name="config")
def fit(cfg: DictConfig) -> float | None:
    if cfg.give_nothing:
        return None
    loss = 0.0
    for step in range(1, cfg.steps + 1):
        loss = (cfg.x - 2) ** 2 + 1 / step  # each step closer to the trial's own floor
        report(loss, step)
    return loss


if __name__ == "__main__":
    fit()
