"""`python -m fashion_sweep.predict run_id=<id>|latest|best [index=0]`: the tutorial's
last step, `Predicted: "...", Actual: "..."`, with a model logged to MLflow."""

from __future__ import annotations

import sys

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import Dataset

from fashion_sweep.config import CONF_DIR, ConfigError, register_configs
from fashion_sweep.data import DataError, load_splits, prepare_raw
from fashion_sweep.model import CLASSES


def predict_one(model: torch.nn.Module, dataset: Dataset, index: int) -> tuple[str, str]:
    """The class the model picks for dataset[index], and the true one."""
    device = next(model.parameters()).device
    model.eval()
    x, y = dataset[index][0], dataset[index][1]
    with torch.no_grad():
        pred = model(x.to(device))
    return CLASSES[pred[0].argmax(0)], CLASSES[y]


def predict(cfg: DictConfig) -> tuple[str, str, str]:
    """Returns (run id, predicted, actual) for test image `cfg.index`."""
    from fashion_sweep.tracking import load_run, resolve_run_id

    if not 0 <= cfg.index < 10_000:
        raise ConfigError(f"index must be in [0, 10000), got {cfg.index}")
    run_id = resolve_run_id(cfg.tracking.uri, cfg.tracking.experiment, cfg.run_id)
    run_cfg, state_dict = load_run(cfg.tracking.uri, run_id)
    model = instantiate(run_cfg.model, _execution_whitelist_=["fashion_sweep.model.*"])
    model.load_state_dict(state_dict)
    prepare_raw(cfg.data.root, cfg.data.download)
    test = load_splits(cfg.data.root)["test"]
    return (run_id, *predict_one(model, test, cfg.index))


register_configs()


@hydra.main(config_path=CONF_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        run_id, predicted, actual = predict(cfg)
    except (ConfigError, DataError, LookupError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"MLflow run {run_id}, test image {cfg.index}")
    print(f'Predicted: "{predicted}", Actual: "{actual}"')


if __name__ == "__main__":
    main()
