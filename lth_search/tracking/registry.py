"""The best ticket as a servable MLflow model (`models:/NAME@best`), without pickles.

The model is the trained sparse network of the best ticket, logged as an MLflow
LoggedModel (the Models column of the runs table, the Models page) with pyfunc's
`loader_module` workflow: plain files (`model.json`, safetensors weights, the ticket's
standard exports, the trained network in the form measured fastest for its shapes on this
machine's device type: CSR/BSR layers or dense, ticket_forms.py) plus the code that rebuilds
the network, `lth_search/portable/`,
bundled as `lth_portable` through `code_paths`. So it loads and predicts with torch and
mlflow alone, from raw inputs (the training split's normalisation is inside), has a
signature and an input example, and `mlflow models serve` can build its environment
(its requirements name only packages an index has).

    model = mlflow.pyfunc.load_model("models:/quickstart@best")
    model.predict(x_raw)          # class ids, from raw inputs: (n, *shape) or one row, float32 or float64
    model.get_raw_model()         # the torch nn.Module (it takes standardised inputs)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lth_search.engine.data import load_dataset, read_raw
from lth_search.engine.plugins import factory_module
from lth_search.portable.export import write_form
from lth_search.portable.ticket_model import TicketModel
from lth_search.ticket_forms import measured_form, model_spec, plugin_factory
from lth_search.tickets import Ticket

log = logging.getLogger(__name__)

ALIAS = "best"
MODEL_NAME = "best_ticket"
BUNDLE = "lth_portable"
"""The name `lth_search/portable/` has inside a logged model."""
EXAMPLE_ROWS = 5


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


def _code_paths(ticket: Ticket, folder: Path) -> list[str]:
    """The portable package (as `lth_portable`) and, for a plug-in model, its factory's top-level module."""
    bundle = folder / BUNDLE
    shutil.copytree(Path(__file__).resolve().parents[1] / "portable", bundle,
                    ignore=shutil.ignore_patterns("__pycache__"))
    paths = [str(bundle)]
    factory = plugin_factory(ticket)
    if factory is not None:
        top = __import__(factory_module(factory).__name__.split(".")[0])
        source = Path(top.__file__)
        paths.append(str(source.parent if source.name == "__init__.py" else source))
    return paths


@contextlib.contextmanager
def _tracking(uri: str) -> Iterator[None]:
    """MLflow's fluent model logging reads the global tracking URI: point it at `uri` meanwhile.

    MLflow's own switch also rewrites $MLFLOW_TRACKING_URI (and unsets it on the way
    back when no URI was set), so the variable is restored here as it was.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    variable = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if variable is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = variable


def input_normalization(cfg: Any) -> dict[str, list[float]] | None:
    """The training split's per-feature mean and std that the served model applies to raw inputs
    (None when the data set is not standardised). Reads the data set (cached: seconds at most)."""
    normalization = load_dataset(cfg.data, cfg.seed).normalization
    if normalization is None:
        return None
    return {"mean": np.asarray(normalization[0]).tolist(), "std": np.asarray(normalization[1]).tolist()}


def log_served_model(client: Any, ticket: Ticket, run_id: str) -> Any:
    """Log the ticket's trained sparse network as a LoggedModel of run `run_id`; returns its ModelInfo.

    Logs to MLflow's global tracking URI (see `_tracking`). Reads the data set (seconds at
    most) for the training split's normalisation and a few raw test inputs as the example.
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.models.model import Model
    from mlflow.types import Schema, TensorSpec

    from lth_search.errors import TrackingError

    if ticket.trained_weights is None:
        raise TrackingError(f"run {ticket.run_id} round {ticket.round}: no trained weights logged; nothing to serve")
    cfg = ticket.config
    normalization = input_normalization(cfg)
    ticket.normalization = normalization  # ticket.json beside model.json says the same
    # raw test inputs as torch holds them (float32); float64, other numbers and a single row work too
    example = np.ascontiguousarray(read_raw(cfg.data)[0][2][:EXAMPLE_ROWS], dtype=np.float32)
    # No input schema: MLflow enforces a tensor spec's dtype and rank exactly, so one would refuse
    # either float64 or float32 batches and any single 1-D row; the model standardises any of them
    # (portable/ticket_model.py). What it takes is in the model's metadata and its input example.
    signature = ModelSignature(outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]))  # class ids
    accepts = {"input_shape": [-1, *ticket.input_shape], "dtypes": ["float32", "float64"],
               "single_row_shape": list(ticket.input_shape), "raw_inputs": True}
    # Created here, in the run's experiment: Model.log alone would put it in the fluent API's
    # active experiment (Default, artifacts under ./mlruns of the current folder).
    logged = client.create_logged_model(
        client.get_run(run_id).info.experiment_id, name=MODEL_NAME, source_run_id=run_id, model_type="lth-ticket",
        tags={"lth.run_id": ticket.run_id, "lth.round": str(ticket.round)},
        params={"sparsity": f"{ticket.sparsity:.4f}", "rewind_step": str(ticket.rewind_step),
                "trial_id": ticket.trial_id},
    )
    spec = model_spec(ticket, normalization)
    formed, formed_spec = measured_form(ticket, spec, _serve_batch(ticket, spec))
    with tempfile.TemporaryDirectory(prefix="lth-served-") as tmp:
        files = ticket.save(Path(tmp) / "ticket", form=lambda staging: write_form(staging, formed, formed_spec,
                                                                                  loader=False), trained=False)
        return Model.log(
            artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id,
            loader_module=f"{BUNDLE}.ticket_model", data_path=str(files), code_paths=_code_paths(ticket, Path(tmp)),
            signature=signature, input_example=example, metadata={"lth_input": accepts,
                                                                  "lth_form": formed_spec["measured"]},
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"], model_id=logged.model_id,
        )


def _serve_batch(ticket: Ticket, spec: dict[str, Any]) -> torch.Tensor:
    """`tracking.serve_batch` standardised test inputs (repeated if the split is smaller): what the
    served form is measured on."""
    cfg = ticket.config
    raw = np.asarray(read_raw(cfg.data)[0][2])
    rows = np.resize(np.arange(len(raw)), cfg.tracking.serve_batch)
    return TicketModel(spec, ticket.trained_weights).standardise(raw[rows])


def register_ticket(client: Any, ticket: Ticket, name: str, run_id: str, tracking_uri: str) -> str:
    """Log `ticket` as a servable model under run `run_id` and point `models:/name@best` at it.

    Does nothing when the alias already names this ticket. Raises MLflow errors.
    """
    if _same_ticket(client, name, ticket) is not None:
        return f"models:/{name}@{ALIAS}"
    with _tracking(tracking_uri):  # logging the model and resolving its models:/m-... source both read it
        return _register(client, ticket, name, run_id)


def _register(client: Any, ticket: Ticket, name: str, run_id: str) -> str:
    """The model's source is the ticket's own lineage run (the child whose mask and weights it is);
    the search run `run_id` lists it too, so its Models column shows the search's best."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.exceptions import MlflowException

    info = log_served_model(client, ticket, ticket.run_id)
    if run_id != ticket.run_id:
        client.log_outputs(run_id, [LoggedModelOutput(info.model_id, step=0)])
    try:
        client.create_registered_model(name, description="lth-search: the best lottery ticket of the search "
                                                          "(trained sparse network; predicts from raw inputs)")
    except MlflowException as error:
        if getattr(error, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name, info.model_uri, run_id=ticket.run_id, model_id=info.model_id,
        tags={"lth.run_id": ticket.run_id, "lth.round": str(ticket.round), "lth.sparsity": f"{ticket.sparsity:.4f}"},
        description=f"trial {ticket.trial_id} round {ticket.round}: sparsity {100 * ticket.sparsity:.2f}%, "
                    f"val {100 * ticket.val_accuracy:.2f}%, test {100 * ticket.test_accuracy:.2f}% "
                    f"(the trained sparse network)",
    )
    client.set_registered_model_alias(name, ALIAS, version.version)
    return f"models:/{name}@{ALIAS}"
