"""The best ticket in the MLflow model registry (`models:/NAME@best`), without pickles.

MLflow's usual Python models are cloudpickled objects. This one uses pyfunc's
`loader_module` workflow instead: the model folder holds the ticket files (Parquet
mask, safetensors θk, JSON config) and MLflow imports this module and calls
`_load_pyfunc(data_path)` to load it, so nothing is unpickled on either side.

    model = mlflow.pyfunc.load_model("models:/quickstart@best")
    model.predict(x)          # class ids for a batch of inputs (preprocessed like the data set)
    model.get_raw_model()     # the torch nn.Module (rewind weights, mask applied)
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lth_search.tickets import Ticket

log = logging.getLogger(__name__)

ALIAS = "best"
MODEL_PATH = "best_ticket"


class TicketPredictor:
    """What `mlflow.pyfunc.load_model` wraps: predict() gives class ids, get_raw_model() the module."""

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket
        self.model = ticket.build_model().eval()

    @torch.no_grad()
    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        x = x.reshape(-1, *self.ticket.input_shape)
        return self.model(x).argmax(dim=1).numpy()

    def get_raw_model(self) -> nn.Module:
        return self.model


def _load_pyfunc(data_path: str) -> TicketPredictor:
    """MLflow's entry point for `loader_module` models."""
    return TicketPredictor(Ticket.load(data_path))


def _same_ticket(client: Any, name: str, ticket: Ticket) -> str | None:
    """The version the alias points at, if it is this very ticket already."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None
    tags = version.tags or {}
    same = tags.get("lth.run_id") == ticket.run_id and tags.get("lth.round") == str(ticket.round)
    return version.version if same else None


def registered_uri(client: Any, ticket: Ticket) -> str | None:
    """`models:/NAME@best` when the registry's best ticket of this search is `ticket`."""
    name = ticket.config.name
    return f"models:/{name}@{ALIAS}" if _same_ticket(client, name, ticket) is not None else None


def register_ticket(client: Any, ticket: Ticket, name: str, run_id: str) -> str:
    """Log `ticket` as a pyfunc model under run `run_id` and point `models:/name@best` at it.

    Does nothing when the alias already names this ticket. Raises MLflow errors.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from lth_search import __version__

    uri = f"models:/{name}@{ALIAS}"
    if _same_ticket(client, name, ticket) is not None:
        return uri
    with tempfile.TemporaryDirectory(prefix="lth-ticket-") as tmp:
        files = ticket.save(Path(tmp) / "ticket")
        model_dir = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            path=str(model_dir), loader_module=__name__, data_path=str(files),
            pip_requirements=[f"lth-search=={__version__}", f"torch>={torch.__version__.split('+')[0]}", "safetensors",
                              "pyarrow"],
        )
        client.log_artifacts(run_id, str(model_dir), MODEL_PATH)
    try:
        client.create_registered_model(name, description="lth-search: the best lottery ticket of the search")
    except MlflowException as error:
        if getattr(error, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_PATH}"
    version = client.create_model_version(
        name, source, run_id=run_id,
        tags={"lth.run_id": ticket.run_id, "lth.round": str(ticket.round), "lth.sparsity": f"{ticket.sparsity:.4f}"},
        description=f"trial {ticket.trial_id} round {ticket.round}: sparsity {100 * ticket.sparsity:.2f}%, "
                    f"val {100 * ticket.val_accuracy:.2f}%, test {100 * ticket.test_accuracy:.2f}%",
    )
    client.set_registered_model_alias(name, ALIAS, version.version)
    return uri
