"""The sweep's best trial as an MLflow Model: its model.pth loaded into the model its
config names, logged as a model of the trial's run with the first test image as input
example, and registered as `tracking.registered_model` (tracking/models.py): once per
best trial, whichever worker or resume ends the sweep."""

from __future__ import annotations

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig

from fashion_sweep.core.data import load_splits
from fashion_sweep.preflight import MODELS
from fashion_sweep.tracking.lookup import load_run

log = logging.getLogger(__name__)


def register(config: DictConfig, best_run_id: str | None) -> str | None:
    """The registered model's URI; None where there is no best trial, no name to register
    it as, or it could not be logged (said in a warning: the sweep's records stand)."""
    uri, name = config.tracking.uri, config.tracking.get("registered_model")
    if not best_run_id or not name:
        return None
    try:
        from fashion_sweep.tracking.models import log_model

        run_config, state_dict = load_run(uri, best_run_id)
        model = instantiate(run_config.model, _execution_whitelist_=MODELS)
        model.load_state_dict(state_dict)
        image, _ = load_splits(run_config.data.root, test_size=1)["test"][0]
        return log_model(uri, best_run_id, model, image.unsqueeze(0), name)
    except Exception as error:
        log.warning(f"the best trial's model was not logged as an MLflow Model: {error}")
        return None
