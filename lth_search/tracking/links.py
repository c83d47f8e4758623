"""Where to look: the MLflow UI command and links, and the `lth-search sync` that fills gaps.

Every message that points a user at MLflow (the search summary, `lineage`, `compare`)
is built here, so they all name the same server, experiment and command. Asking MLflow
for the experiment id may fail like any call; a link is then left out, never an error.
"""

from __future__ import annotations

from lth_search.config import ExperimentConfig
from lth_search.tracking.client import MlflowIO


def sync_hint(cfg: ExperimentConfig) -> str:
    """The arguments of the `lth-search sync` that fills in what MLflow missed."""
    return f"{cfg.name} --output-dir {cfg.output_path()}"


def experiment_id(cfg: ExperimentConfig) -> str | None:
    """The id of the config's MLflow experiment (for links), or None when MLflow does not answer."""
    if not cfg.tracking.enabled:
        return None
    io = MlflowIO(cfg.tracking_uri(), sync_hint(cfg))
    ok, value = io.call("look up the experiment", lambda: io.experiment_id(cfg.experiment_name()))
    return value if ok else None


def ui_links(tracking_uri: str, experiment: str | None) -> dict[str, str]:
    """How to look: the command that serves the UI and the runs-table link (MLflow 3 opens
    its GenAI view otherwise)."""
    served = tracking_uri.startswith(("http://", "https://"))
    base = tracking_uri.rstrip("/") if served else "http://127.0.0.1:5000"
    links = {"mlflow_command": f"open {base} (the MLflow server of this search)" if served
             else f"mlflow ui --backend-store-uri {tracking_uri} --port 5000"}
    if experiment is not None:
        links["mlflow_link"] = f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning"
    return links


def ui_hint(tracking_uri: str, experiment: str | None) -> str:
    """`ui_links` as one line."""
    links = ui_links(tracking_uri, experiment)
    link = links.get("mlflow_link", tracking_uri)
    return f"open {link}" if tracking_uri.startswith(("http://", "https://")) else f"{links['mlflow_command']}, then open {link}"
