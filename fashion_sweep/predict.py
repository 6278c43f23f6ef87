"""`python -m fashion_sweep.predict run_id=<id>|latest|best [index=0]`: the tutorial's
last step, `Predicted: "...", Actual: "..."`, with a model logged to MLflow
(run.predict)."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from fashion_sweep import signals

    signals.hold()  # a Ctrl-C during the imports is acted on once they are done

import hydra
from omegaconf import DictConfig

from fashion_sweep.config import CONF_DIR, ConfigError, register_configs
from fashion_sweep.core.data import DataError
from fashion_sweep.run import predict

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
    from fashion_sweep import mistakes

    mistakes.run(main)
