"""Links into MLflow's UI: a run's page, the compare view of a sweep's trials, an
experiment's runs table. As fragments (`#/...`) for descriptions the UI renders, and
whole, on the UI a user opens for the store (the server's address, or `mlflow ui`'s
default for a local store), for the console."""

from __future__ import annotations

import json
from urllib.parse import quote, urlsplit, urlunsplit

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default
DEFAULT_STORE = "sqlite:///mlflow.db"  # conf/tracking/mlflow.yaml, what `mlflow ui` reads


def ui(uri: str) -> str:
    """The UI's address for a tracking URI."""
    if uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)  # credentials left out: the browser asks for its own
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])).rstrip("/")
    return LOCAL_UI


def run(experiment_id: str, run_id: str) -> str:
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def view(experiment_id: str, key: str) -> str:
    """The runs table as a view the experiment shares (tracking/sweep_runs.share_view)."""
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={key}"


def compare(experiment_id: str, run_ids: list[str]) -> str:
    """The compare view of `run_ids`: its query holds JSON lists, percent-encoded so a
    markdown link keeps them whole (a raw `"` ends the link in MLflow's renderer)."""
    runs = quote(json.dumps(run_ids, separators=(",", ":")), safe="")
    experiments = quote(json.dumps([experiment_id]), safe="")
    return f"#/compare-runs?runs={runs}&experiments={experiments}"


def artifact(run_id: str, path: str) -> str:
    """An artifact's file as the UI's server serves it (relative to the UI's page)."""
    return f"get-artifact?path={quote(path, safe='')}&run_uuid={run_id}"
