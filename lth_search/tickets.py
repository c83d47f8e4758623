"""The best ticket of a search, fetched from MLflow alone, as a ready model.

A ticket is one (trial, round): the round's mask plus the trial's rewind weights θk
and the recipe that retrains it. Selection uses validation accuracy and reporting
uses test, as in the search. Default criterion: the sparsest ticket whose val accuracy
is within the trial config's `search.tolerance` of its dense network (ties: higher
val); `max_accuracy_drop` replaces the tolerance; `min_sparsity` asks instead for the
best val accuracy at or above a sparsity.

    t = best_ticket(experiment="quickstart", max_accuracy_drop=0.01)
    model = t.build_model()   # nn.Module at θk, mask applied, rescale applied
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lth_search.config import ExperimentConfig, validate_config
from lth_search.config.names import check_location
from lth_search.engine.objective import is_matching
from lth_search.engine.pruning import layer_sparsity, masked_state, rewind_weights
from lth_search.errors import RuntimeFailure, TrackingError
from lth_search.store.codec import (
    Mask,
    decode_mask,
    decode_weights,
    encode_mask,
    encode_weights,
)
from lth_search.tracking.client import first_line, metric_history, read_artifact
from lth_search.tracking.layout import (
    CONFIG,
    INPUT_SHAPE,
    NUM_CLASSES,
    mask_artifact,
    metric_name,
    rescale_metric,
    rewind_artifact,
)
from lth_search.tracking.ticket_table import SearchRef, read_confirmation, read_rows

SUMMARY_KEYS = ("run_id", "round", "sparsity", "val_accuracy", "test_accuracy", "dense_val_accuracy", "params")


@dataclass
class Ticket:
    """A winning-ticket candidate: mask, rewind weights, the config that made it, its numbers."""

    run_id: str
    round: int
    sparsity: float
    metrics: dict[str, float]
    params: dict[str, Any]
    config: ExperimentConfig
    mask: Mask
    rewind_weights: dict[str, torch.Tensor]
    input_shape: tuple[int, ...]
    num_classes: int
    trial_id: str = ""
    experiment: str = ""
    search_run_id: str | None = None
    criterion: str = ""
    rescale: dict[str, float] = field(default_factory=dict)
    """Per-layer factors the survivors were scaled by at rewind, as the trial logged them."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def val_accuracy(self) -> float:
        return self.metrics["val_accuracy"]

    @property
    def test_accuracy(self) -> float:
        return self.metrics["test_accuracy"]

    @property
    def rewind_step(self) -> int:
        return self.config.prune.rewind_step

    def build_model(self) -> nn.Module:
        """The model at θk with the mask and the trial's rescale (prune.init_scale) applied.

        Retrain it with `lth_search.engine.train.train(model, data, t.config.train, t.config.seed,
        t.rewind_step, mask=t.mask)` to reproduce the ticket's reported accuracy.
        """
        from lth_search.engine.models import build_model

        cfg = self.config
        model = build_model(cfg.model, self.input_shape, self.num_classes, cfg.seed)
        if set(self.mask) <= set(self.rescale):
            state = masked_state(self.rewind_weights, self.mask, self.rescale)
        else:  # a run logged before factors were recorded: recompute them from the rule
            state = rewind_weights(self.rewind_weights, self.mask, cfg.prune.init_scale)
        model.load_state_dict(state)
        return model

    def summary(self) -> dict[str, Any]:
        """What `lth-search best --json` prints (JSON-safe)."""
        return {
            "run_id": self.run_id,
            "round": self.round,
            "sparsity": self.sparsity,
            "val_accuracy": self.metrics.get("val_accuracy"),
            "test_accuracy": self.metrics.get("test_accuracy"),
            "dense_val_accuracy": self.metrics.get("dense_val_accuracy"),
            "dense_test_accuracy": self.metrics.get("dense_test_accuracy"),
            "params": self.params,
            "trial_id": self.trial_id,
            "experiment": self.experiment,
            "search_run_id": self.search_run_id,
            "criterion": self.criterion,
            "rewind_step": self.rewind_step,
            "init_scale": self.config.prune.init_scale,
            **self.extra,
        }

    # Files ------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write mask.parquet, rewind.safetensors (θk before masking), config.json, ticket.json.

        All four files are written into a staging folder beside `directory` and moved in
        together, so a failure (no permission, disk full) leaves no partial ticket; an
        existing ticket folder is replaced, anything else already there is refused.
        """
        folder = Path(check_location(str(directory), "ticket folder", TrackingError)).expanduser()
        if folder.exists() and not (folder.is_dir() and (not any(folder.iterdir()) or (folder / "ticket.json").is_file())):
            raise TrackingError(f"{folder}: exists and is not a ticket folder; give a new or empty folder to --out")
        about = {**self.summary(), "metrics": self.metrics, "input_shape": list(self.input_shape),
                 "num_classes": self.num_classes, "rescale": self.rescale}
        files = {
            "mask.parquet": encode_mask(self.mask),
            "rewind.safetensors": encode_weights(self.rewind_weights),
            "config.json": json.dumps(self.config.model_dump(mode="json"), indent=2).encode(),
            "ticket.json": json.dumps(about, indent=2).encode(),
        }
        staging = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
            for name, data in files.items():
                (staging / name).write_bytes(data)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        except OSError as error:
            raise RuntimeFailure(f"{folder}: cannot write the ticket ({error.strerror or error})") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, directory: str | Path) -> "Ticket":
        """A ticket written by `save` (no pickles: Parquet, safetensors, JSON)."""
        folder = Path(directory).expanduser()
        try:
            about = json.loads((folder / "ticket.json").read_text())
            config = validate_config(json.loads((folder / "config.json").read_text()), source=str(folder / "config.json"))
            mask = decode_mask((folder / "mask.parquet").read_bytes())
            weights = decode_weights((folder / "rewind.safetensors").read_bytes())
        except FileNotFoundError as error:
            raise TrackingError(f"{folder}: not a saved ticket ({Path(error.filename).name} missing)") from None
        except ValueError as error:
            raise TrackingError(f"{folder}: unreadable ticket ({first_line(error)})") from None
        known = {"run_id", "round", "sparsity", "params", "trial_id", "experiment", "search_run_id", "criterion"}
        return cls(
            config=config, mask=mask, rewind_weights=weights, metrics=about["metrics"],
            input_shape=tuple(about["input_shape"]), num_classes=int(about["num_classes"]),
            rescale=about.get("rescale", {}), **{key: about[key] for key in known},
        )


# Selection ---------------------------------------------------------------------------------
def _check_fraction(value: float | None, what: str, example: str) -> None:
    if value is not None and not 0 <= value <= 1:
        raise TrackingError(f"{what} is a fraction in [0, 1] ({example}), got {value}")


def criterion_text(max_accuracy_drop: float | None = None, min_sparsity: float | None = None) -> str:
    if min_sparsity is not None:
        return f"best val accuracy at sparsity >= {100 * min_sparsity:.2f}%"
    if max_accuracy_drop is not None:
        return f"sparsest ticket within {100 * max_accuracy_drop:.2f} pp of dense val accuracy"
    return "sparsest ticket within the search tolerance of dense val accuracy"


def select_ticket(rows: list[dict[str, Any]], max_accuracy_drop: float | None = None,
                  min_sparsity: float | None = None, confirmed_trial: str | None = None) -> dict[str, Any]:
    """The chosen ticket row (see the module docstring); TrackingError when none qualifies.

    Without a criterion, a search's confirmed recipe decides: the ticket is the matching
    round of `confirmed_trial` (the search trial of the recipe confirmed on fresh seeds),
    not the luckiest round of any trial.
    """
    if max_accuracy_drop is not None and min_sparsity is not None:
        raise TrackingError("give max_accuracy_drop or min_sparsity, not both")
    _check_fraction(max_accuracy_drop, "max_accuracy_drop", "0.01 = 1 pp")
    _check_fraction(min_sparsity, "min_sparsity", "0.9 = 90%")
    if not rows:
        raise TrackingError("the search has no tickets in MLflow yet (no completed round)")
    if confirmed_trial is not None and max_accuracy_drop is None and min_sparsity is None:
        confirmed = [r for r in rows if r["trial_id"] == confirmed_trial]
        rows = confirmed or rows
    if min_sparsity is not None:
        pool = [r for r in rows if r["sparsity"] >= min_sparsity - 1e-12]
        if not pool:
            top = max(r["sparsity"] for r in rows)
            raise TrackingError(f"no ticket at sparsity >= {100 * min_sparsity:.2f}% (the sparsest has {100 * top:.2f}%)")
        return max(pool, key=lambda r: (r["val_accuracy"], r["sparsity"]))

    def allowed(row: dict[str, Any]) -> float | None:
        return max_accuracy_drop if max_accuracy_drop is not None else row["tolerance"]

    pool = [
        r for r in rows
        if r["dense_val_accuracy"] is not None and allowed(r) is not None
        and is_matching(r["val_accuracy"], r["dense_val_accuracy"], allowed(r))
    ]
    if not pool:
        closest = min((r for r in rows if r["dense_val_accuracy"] is not None),
                      key=lambda r: r["dense_val_accuracy"] - r["val_accuracy"], default=None)
        hint = "" if closest is None else (
            f" (the closest drops {100 * (closest['dense_val_accuracy'] - closest['val_accuracy']):.2f} pp)")
        raise TrackingError(f"no ticket matches: none of {len(rows)} is the {criterion_text(max_accuracy_drop)}{hint}")
    return max(pool, key=lambda r: (r["sparsity"], r["val_accuracy"]))


# Loading -----------------------------------------------------------------------------------
def load_ticket(client: Any, ref: SearchRef, row: dict[str, Any], criterion: str = "") -> Ticket:
    """The full ticket of a row: config, mask and θk downloaded from the run's artifacts."""
    from mlflow.exceptions import MlflowException

    run_id = row["run_id"]
    try:
        run = client.get_run(run_id)
        config = validate_config(json.loads(read_artifact(client, run_id, CONFIG)), source=f"run {run_id} config.json")
        mask = decode_mask(read_artifact(client, run_id, mask_artifact(row["round"])))
        weights = decode_weights(read_artifact(client, run_id, rewind_artifact(config.prune.rewind_step)))
        rescale = _rescale_at(client, run_id, mask, int(row["round"]))
    except (MlflowException, OSError) as error:
        raise TrackingError(
            f"run {run_id} round {row['round']}: cannot read its artifacts ({first_line(error)}); "
            f"if MLflow was down during the search, run `lth-search sync NAME` first"
        ) from None
    tags = run.data.tags
    metrics = {key: row[key] for key in ("val_accuracy", "test_accuracy", "sparsity", "dense_val_accuracy",
                                         "dense_test_accuracy", "train_loss", "reused", "tolerance")}
    metrics.update({f"layer_sparsity/{metric_name(k)}": v for k, v in layer_sparsity(mask).items()})
    return Ticket(
        run_id=run_id, round=int(row["round"]), sparsity=float(row["sparsity"]), metrics=metrics,
        params=dict(row["params"]), config=config, mask=mask, rewind_weights=weights, rescale=rescale,
        input_shape=tuple(json.loads(tags[INPUT_SHAPE])), num_classes=int(tags[NUM_CLASSES]),
        trial_id=str(row["trial_id"]), experiment=ref.experiment_name, search_run_id=ref.search_run_id,
        criterion=criterion,
    )


def _rescale_at(client: Any, run_id: str, mask: Mask, round_index: int) -> dict[str, float]:
    """The rescale factors a trial logged for a round ({} if it logged none)."""
    factors = {}
    for layer in mask:
        history = metric_history(client, run_id, rescale_metric(layer))
        if round_index in history:
            factors[layer] = history[round_index]
    return factors


def best_ticket(experiment: str | None = None, search_run_id: str | None = None, max_accuracy_drop: float | None = None,
                min_sparsity: float | None = None, tracking_uri: str | None = None) -> Ticket:
    """The best ticket of a search, read from MLflow alone (no store, no Ray).

    `experiment` None: the most recently created experiment holding an lth-search
    search; `search_run_id` picks one search of an experiment (default: the latest).
    Tracking URI: the argument, else $MLFLOW_TRACKING_URI, else mlflow.db in the default output_dir.
    """
    _check_fraction(max_accuracy_drop, "max_accuracy_drop", "0.01 = 1 pp")
    _check_fraction(min_sparsity, "min_sparsity", "0.9 = 90%")
    ref, rows, client = read_rows(experiment, search_run_id, tracking_uri)
    confirmation = read_confirmation(client, ref)
    confirmed_trial = confirmation.get("trial_id") if confirmation else None
    try:
        row = select_ticket(rows, max_accuracy_drop, min_sparsity, confirmed_trial)
    except TrackingError as error:
        raise TrackingError(f"experiment {ref.experiment_name}: {error}") from None
    ticket = load_ticket(client, ref, row, criterion_text(max_accuracy_drop, min_sparsity))
    if confirmation:
        ticket.extra["confirmation"] = confirmation
    from lth_search.tracking.registry import registered_uri

    model_uri = registered_uri(client, ticket)
    if model_uri is not None:
        ticket.extra["model_uri"] = model_uri
    return ticket


def list_tickets(experiment: str | None = None, tracking_uri: str | None = None,
                 search_run_id: str | None = None) -> list[dict[str, Any]]:
    """Every ticket (trial-round) of a search: one dict per row, as in tickets.parquet."""
    return read_rows(experiment, search_run_id, tracking_uri)[1]


# Text ----------------------------------------------------------------------------------------
def _choices(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def describe_ticket(ticket: Ticket) -> str:
    """A few readable lines about a ticket (what `lth-search best` prints)."""
    m = ticket.metrics
    dense_val, dense_test = m.get("dense_val_accuracy"), m.get("dense_test_accuracy")
    drop = "" if dense_val is None else f" ({100 * (m['val_accuracy'] - dense_val):+.2f} pp vs dense {100 * dense_val:.2f}%)"
    test = "" if dense_test is None else f" (dense {100 * dense_test:.2f}%)"
    registered = ticket.extra.get("model_uri")
    return "\n".join([
        f"best ticket of {ticket.experiment}: trial {ticket.trial_id}, round {ticket.round} [{ticket.criterion}]",
        f"  sparsity {100 * ticket.sparsity:.2f}%  ({100 * (1 - ticket.sparsity):.2f}% of prunable weights remain)",
        f"  val  {100 * m['val_accuracy']:.2f}%{drop}",
        f"  test {100 * m['test_accuracy']:.2f}%{test}",
        f"  choices: {_choices(ticket.params) or '(none searched)'}; rewind to step {ticket.rewind_step}",
        f"  MLflow run {ticket.run_id}",
        f"  in Python: best_ticket(experiment={ticket.experiment!r}).build_model()",
        *([f"  registered: mlflow.pyfunc.load_model({registered!r})"] if registered else []),
    ])


def format_tickets(table: list[dict[str, Any]]) -> str:
    """Every ticket as a fixed-width table, by trial then round."""
    if not table:
        return "no tickets"
    header = (f"{'trial':<22} {'round':>5} {'sparsity':>9} {'val':>7} {'test':>7} {'dense val':>9} {'Δval':>8} "
              f"{'match':>5} {'reused':>6}  choices")
    lines = [header]
    for row in table:
        dense = row.get("dense_val_accuracy")
        delta = "" if dense is None else f"{100 * (row['val_accuracy'] - dense):+.2f}pp"
        match = {True: "yes", False: "no", None: "?"}[row.get("matching")]
        lines.append(
            f"{str(row['trial_id'])[:22]:<22} {row['round']:>5} {100 * row['sparsity']:>8.2f}% "
            f"{100 * row['val_accuracy']:>6.2f}% {100 * row['test_accuracy']:>6.2f}% "
            f"{'' if dense is None else f'{100 * dense:.2f}%':>9} {delta:>8} {match:>5} {row.get('reused', 0):>6}  "
            f"{_choices(row.get('params') or {})}"
        )
    return "\n".join(lines)
