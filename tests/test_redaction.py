"""A password in a URI is masked in every log record and in Hydra's .hydra/ files.

The whole path (a real sweep with a PostgreSQL password and an MLflow token, its
stdout, stderr, logs, .hydra/ files and MLflow runs) is tests/test_scale.py's
test_passwords_and_tokens_never_reach_mlflow_or_the_log.
"""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

from fashion_sweep.sweeps.callbacks import RedactHydraFiles
from fashion_sweep.tracking.redaction import mask_log_records, one_line, redact

URI = "postgresql+psycopg://sweeper:s3cret@db.example:5432/optuna"


def test_redact_masks_the_password_and_keeps_the_rest():
    assert redact(URI) == "postgresql+psycopg://sweeper:***@db.example:5432/optuna"
    assert redact("tracking.uri=http://me\\:tok-1@host:5000") == (
        "tracking.uri=http://me\\:***@host:5000"  # as Hydra logs an override
    )
    assert (
        redact("sqlite:///mlflow.db http://host:5000/x") == "sqlite:///mlflow.db http://host:5000/x"
    )
    assert one_line(ValueError(f"cannot reach {URI}\nmore")) == (
        "ValueError: cannot reach postgresql+psycopg://sweeper:***@db.example:5432/optuna"
    )


def test_every_log_record_of_the_process_is_masked_whatever_logs_it(caplog):
    mask_log_records()
    mask_log_records()  # once is enough; twice changes nothing
    caplog.set_level(logging.INFO)
    some_library = logging.getLogger("some.library.nobody.filtered")
    some_library.info("connecting to %s", URI)
    try:
        raise ConnectionError(f"refused: {URI}")
    except ConnectionError:
        some_library.exception("failed")
    text = caplog.text
    assert "s3cret" not in text
    assert "sweeper:***@db.example" in text and "ConnectionError: refused" in text


def test_the_jobs_hydra_files_are_rewritten_masked(tmp_path):
    hydra_dir = tmp_path / ".hydra"
    hydra_dir.mkdir()
    (hydra_dir / "overrides.yaml").write_text(f"- hydra.sweeper.storage={URI}\n")
    (hydra_dir / "config.yaml").write_text("tracking:\n  uri: sqlite:///mlflow.db\n")
    config = OmegaConf.create(
        {"hydra": {"output_subdir": ".hydra", "runtime": {"output_dir": str(tmp_path)}}}
    )
    RedactHydraFiles().on_job_start(config=config)
    assert "s3cret" not in (hydra_dir / "overrides.yaml").read_text()
    assert "sweeper:***@" in (hydra_dir / "overrides.yaml").read_text()
    assert (hydra_dir / "config.yaml").read_text() == "tracking:\n  uri: sqlite:///mlflow.db\n"
