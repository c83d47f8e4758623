"""A lottery ticket and how to pick one: pure (MLflow access lives in tracking/ticket_reader.py).

A ticket is one (trial, round), and it has two halves that must not be confused:

- the ticket to retrain: the round's mask plus the rewind weights θk (rescaled as the
  trial rescaled them), the starting point of a new sparse training run
  (`Ticket.rewound_model()`, `rewind.safetensors`);
- the trained sparse network: the round's trained end weights, pruned entries zero,
  for inference (`Ticket.trained_model()`, `trained.safetensors`, `models:/NAME@best`).

Selection uses validation accuracy and reporting uses test, as in the search. Default
criterion: the search's best ticket (runs/best.py, the one definition the console, the
parent run and the registered model share): the round that ends the unbroken matching
run of the best trial of the confirmed recipe. `max_accuracy_drop` asks another question,
and says so: the sparsest round within that val drop of dense; `min_sparsity` the best
val accuracy at or above a sparsity.

    t = lth_search.best_ticket(experiment="quickstart", max_accuracy_drop=0.01)
    net = t.trained_model()     # inference: the trained sparse network
    start = t.rewound_model()   # retraining: θk, mask and rescale applied
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch
from torch import nn

from lth_search.config import ExperimentConfig, validate_config
from lth_search.config.names import check_location
from lth_search.engine.lineage.metric import Metric, metric_named
from lth_search.engine.lineage.objective import is_matching
from lth_search.engine.pruning import masked_state, rewind_weights
from lth_search.errors import ConfigError, RuntimeFailure, TrackingError
from lth_search.runs.best import TrialTicket, best_trial_ticket
from lth_search.store.codec import Mask

MASK_SUFFIX = "_mask"
"""`mask.safetensors` keys are `<module>.weight_mask`, the buffer `torch.nn.utils.prune` keeps."""
FILES = {
    "mask.safetensors": "mask per pruned parameter, key <module>.weight_mask, 1.0 kept / 0.0 pruned "
                        "(torch.nn.utils.prune.custom_from_mask takes it)",
    "rewind.safetensors": "the ticket to retrain: theta_k with the mask and the trial's rescale applied",
    "trained.safetensors": "the trained sparse network (the round's end weights, pruned entries zero)",
    "config.json": "the trial's full lth-search config",
    "ticket.json": "this card: numbers, choices, shapes, files",
}
SUMMARY_KEYS = ("run_id", "round", "sparsity", "val_accuracy", "test_accuracy", "dense_val_accuracy", "params")


@dataclass
class Ticket:
    """A winning-ticket candidate: mask, rewind weights θk, trained weights, its config and numbers."""

    run_id: str
    round: int
    sparsity: float
    metrics: dict[str, float]
    params: dict[str, Any]
    config: ExperimentConfig
    mask: Mask
    rewind_weights: dict[str, torch.Tensor]
    """θk as the dense run saved it (before masking and rescale)."""
    input_shape: tuple[int, ...]
    num_classes: int
    trained_weights: dict[str, torch.Tensor] | None = None
    """The round's trained end weights (pruned entries exactly zero); None for runs logged before they were."""
    trial_id: str = ""
    experiment: str = ""
    search_run_id: str | None = None
    criterion: str = ""
    rescale: dict[str, float] = field(default_factory=dict)
    """Per-layer factors the survivors were scaled by at rewind, as the trial logged them."""
    extra: dict[str, Any] = field(default_factory=dict)
    normalization: dict[str, list[float]] | None = None
    """The training split's per-feature `mean` and `std`: the trained network takes (x - mean) / std
    of raw inputs, as the served model computes it; None when the data set is not standardised."""

    @property
    def val_accuracy(self) -> float:
        return self.metrics["val_accuracy"]

    @property
    def test_accuracy(self) -> float:
        return self.metrics["test_accuracy"]

    def metric_summary(self) -> dict[str, Any]:
        """The metric the search judged, by name and direction, with its values (`val_loss`,
        `dense_val_perplexity`, ...); {} for accuracy, whose values are `val_accuracy` & co."""
        name = self.metrics.get("metric")
        if not name or name == "accuracy":
            return {}
        metric = metric_named(name)
        keys = [metric.val_key, metric.test_key, f"dense_{metric.val_key}", f"dense_{metric.test_key}"]
        return {"metric": metric.name, "direction": metric.direction, **{k: self.metrics.get(k) for k in keys}}

    @property
    def rewind_step(self) -> int:
        return self.config.prune.rewind_step

    def _empty_model(self) -> nn.Module:
        from lth_search.engine.models import build_model

        cfg = self.config
        return build_model(cfg.model, self.input_shape, self.num_classes, cfg.seed)

    def rewound_state(self) -> dict[str, torch.Tensor]:
        """θk with the mask and the trial's rescale (prune.init_scale) applied: the ticket to retrain."""
        if set(self.mask) <= set(self.rescale):
            return masked_state(self.rewind_weights, self.mask, self.rescale)
        # a run logged before factors were recorded: recompute them from the rule
        return rewind_weights(self.rewind_weights, self.mask, self.config.prune.init_scale)

    def rewound_model(self) -> nn.Module:
        """The ticket to retrain: the model at θk, mask and rescale applied (untrained).

        Retrain it with `lth_search.engine.train.train(model, data, t.config.train, t.config.seed,
        t.rewind_step, mask=t.mask)` to reproduce the ticket's reported accuracy.
        """
        model = self._empty_model()
        model.load_state_dict(self.rewound_state())
        return model

    build_model = rewound_model
    """The name before the two halves had names of their own: the ticket to retrain."""

    def trained_model(self) -> nn.Module:
        """The trained sparse network, for inference (eval mode); its accuracy is the ticket's."""
        if self.trained_weights is None:
            raise TrackingError(f"run {self.run_id} round {self.round}: no trained weights were logged "
                                f"(a run from before lth-search logged them); retrain t.rewound_model()")
        model = self._empty_model()
        model.load_state_dict(self.trained_weights)
        return model.eval()

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
            **self.metric_summary(),
            "params": self.params,
            "trial_id": self.trial_id,
            "experiment": self.experiment,
            "search_run_id": self.search_run_id,
            "criterion": self.criterion,
            "rewind_step": self.rewind_step,
            "init_scale": self.config.prune.init_scale,
            "inference": {k.removeprefix("inference_"): v for k, v in self.metrics.items() if k.startswith("inference_")},
            **self.extra,
        }

    # Files ------------------------------------------------------------------------------------
    def save(self, directory: str | Path, form: Callable[[Path], None] | None = None,
             trained: bool = True) -> Path:
        """Write the standard files (`FILES`): safetensors a PyTorch user loads directly, JSON card.

        `form(staging)` adds the trained network in an inference form (ticket_forms.py), in
        which case `trained` False leaves the dense `trained.safetensors` out.

        All files are written into a staging folder beside `directory` and moved in
        together, so a failure (no permission, disk full) leaves no partial ticket; an
        existing ticket folder is replaced, anything else already there is refused.
        """
        folder = Path(check_location(str(directory), "ticket folder", TrackingError)).expanduser()
        if folder.exists() and not (folder.is_dir() and (not any(folder.iterdir()) or (folder / "ticket.json").is_file())):
            raise TrackingError(f"{folder}: exists and is not a ticket folder; give a new or empty folder to --out")
        rewound = self.rewound_state()
        files = {
            "mask.safetensors": safetensors.torch.save(mask_tensors(self.mask, rewound)),
            "rewind.safetensors": safetensors.torch.save(_contiguous(rewound)),
            "config.json": json.dumps(self.config.model_dump(mode="json"), indent=2).encode(),
        }
        if self.trained_weights is not None and trained:
            files["trained.safetensors"] = safetensors.torch.save(_contiguous(self.trained_weights))
        card = {**self.summary(), "metrics": self.metrics, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "rescale_applied": self.rescale,
                "normalization": self.normalization,
                "files": {name: about for name, about in FILES.items() if name in files or name == "ticket.json"}}
        files["ticket.json"] = json.dumps(card, indent=2).encode()
        staging = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
            for name, data in files.items():
                (staging / name).write_bytes(data)
            if form is not None:
                form(staging)
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
        """A ticket written by `save` (no pickles: safetensors and JSON)."""
        folder = Path(directory).expanduser()
        try:
            card = json.loads((folder / "ticket.json").read_text())
            config = validate_config(json.loads((folder / "config.json").read_text()), source=str(folder / "config.json"))
            masks = safetensors.torch.load_file(str(folder / "mask.safetensors"))
            rewound = safetensors.torch.load_file(str(folder / "rewind.safetensors"))
            trained_file = folder / "trained.safetensors"
            trained = safetensors.torch.load_file(str(trained_file)) if trained_file.exists() else None
        except FileNotFoundError as error:
            raise TrackingError(f"{folder}: not a saved ticket ({Path(error.filename).name} missing)") from None
        except (ValueError, OSError) as error:
            raise TrackingError(f"{folder}: unreadable ticket ({type(error).__name__}: {error})") from None
        mask = {key.removesuffix(MASK_SUFFIX): value.bool() for key, value in masks.items()}
        known = {"run_id", "round", "sparsity", "params", "trial_id", "experiment", "search_run_id", "criterion"}
        return cls(
            config=config, mask=mask, rewind_weights=rewound, trained_weights=trained, metrics=card["metrics"],
            input_shape=tuple(card["input_shape"]), num_classes=int(card["num_classes"]),
            rescale={name: 1.0 for name in mask},  # rewind.safetensors holds θk already rescaled
            normalization=card.get("normalization"), **{key: card[key] for key in known},
        )


def mask_tensors(mask: Mask, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mask as `torch.nn.utils.prune` keeps it: `<module>.weight_mask`, the weight's dtype, 1 = kept."""
    return {name + MASK_SUFFIX: kept.to(like[name].dtype).contiguous() for name, kept in mask.items()}


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.contiguous() for name, tensor in state.items()}


# Selection ---------------------------------------------------------------------------------
def check_fraction(value: float | None, what: str, example: str) -> None:
    if value is not None and not 0 <= value <= 1:
        raise ConfigError(f"{what} is a fraction in [0, 1] ({example}), got {value}")


def criterion_text(max_accuracy_drop: float | None = None, min_sparsity: float | None = None) -> str:
    if min_sparsity is not None:
        return f"not the search's best ticket: the best val accuracy at sparsity >= {100 * min_sparsity:.2f}%"
    if max_accuracy_drop is not None:
        return (f"not the search's best ticket: the sparsest round within {100 * max_accuracy_drop:.2f} pp of "
                "dense val accuracy")
    return "the search's best ticket: the end of the unbroken matching run of its best (confirmed) trial"


def select_ticket(rows: list[dict[str, Any]], max_accuracy_drop: float | None = None,
                  min_sparsity: float | None = None, confirmed_trial: str | None = None) -> dict[str, Any]:
    """The chosen ticket row (see the module docstring); TrackingError when none qualifies.

    Without a criterion, a search's confirmed recipe decides: the ticket is the matching
    round of `confirmed_trial` (the search trial of the recipe confirmed on fresh seeds),
    not the luckiest round of any trial.
    """
    if max_accuracy_drop is not None and min_sparsity is not None:
        raise ConfigError("give max_accuracy_drop or min_sparsity, not both")
    check_fraction(max_accuracy_drop, "max_accuracy_drop", "0.01 = 1 pp")
    check_fraction(min_sparsity, "min_sparsity", "0.9 = 90%")
    if not rows:
        raise TrackingError("the search has no tickets in MLflow yet (no completed round)")
    trained = [r for r in rows if not r.get("failed")]
    if not trained:
        raise TrackingError(f"no ticket: every round of the {len(rows)} failed to train (see the runs' lth.failed tag)")
    rows = trained
    if max_accuracy_drop is None and min_sparsity is None and all(r.get("matching_round", -1) >= 0 for r in rows):
        return _search_best(rows, confirmed_trial)
    if min_sparsity is not None:
        pool = [r for r in rows if r["sparsity"] >= min_sparsity - 1e-12]
        if not pool:
            top = max(r["sparsity"] for r in rows)
            raise TrackingError(f"no ticket at sparsity >= {100 * min_sparsity:.2f}% (the sparsest has {100 * top:.2f}%)")
        return max(pool, key=lambda r: (_ranked(r), r["sparsity"]))

    def allowed(row: dict[str, Any]) -> float | None:
        return max_accuracy_drop if max_accuracy_drop is not None else row["tolerance"]

    pool = [
        r for r in rows
        if _judged(r, "dense_val") is not None and allowed(r) is not None
        and is_matching(_ranked(r), _ranked(r, "dense_val"), allowed(r))
    ]
    if not pool:
        closest = min((r for r in rows if _judged(r, "dense_val") is not None),
                      key=lambda r: _ranked(r, "dense_val") - _ranked(r), default=None)
        hint = "" if closest is None else (
            f" (the closest drops {row_metric(closest).format_margin(_ranked(closest, 'dense_val') - _ranked(closest))})")
        raise TrackingError(f"no ticket matches: none of {len(rows)} is the {criterion_text(max_accuracy_drop)}{hint}")
    return max(pool, key=lambda r: (r["sparsity"], _ranked(r)))


def row_metric(row: dict[str, Any]) -> Metric:
    """The metric a ticket row was judged on (rows without one: accuracy)."""
    return metric_named(row.get("metric"))


def _judged(row: dict[str, Any], prefix: str = "val") -> float | None:
    """A row's value in the verdict's units: accuracy, or the mean loss (a perplexity's log)."""
    metric = row_metric(row)
    value = row.get(f"{prefix}_{metric.name}")
    if value is None or metric.name != "perplexity":
        return value
    return math.log(value) if value > 0 else -math.inf


def _ranked(row: dict[str, Any], prefix: str = "val") -> float:
    """`_judged` signed so that larger is better (a loss negated): drops and ties compare alike."""
    value = _judged(row, prefix)
    if value is None:
        return -math.inf
    return value if row_metric(row).higher_is_better else -value


def _search_best(rows: list[dict[str, Any]], confirmed_trial: str | None) -> dict[str, Any]:
    """The row of the search's best ticket (runs/best.py): the round that ends the unbroken
    matching run of the best trial (of the confirmed trial, when the search confirmed one)."""
    ends = {(str(r["trial_id"]), r["round"]): r for r in rows}
    tickets = {}
    for r in rows:  # every trial's ticket; round 0 (the dense network) when none of its rounds matched
        trial, end = str(r["trial_id"]), int(r["matching_round"])
        tickets[trial] = (TrialTicket(trial, end, r["sparsity"], r["val_accuracy"], val_value=_judged(r),
                                      higher_is_better=row_metric(r).higher_is_better) if r["round"] == end else
                          tickets.get(trial, TrialTicket(trial, 0, 0.0, r["dense_val_accuracy"] or 0.0)))
    best = best_trial_ticket(tickets.values(), trial_id=confirmed_trial)
    if best is None or best.round == 0:
        closest = max(rows, key=lambda r: r.get("margin") if r.get("margin") is not None else -1.0)
        margin = closest.get("margin")
        hint = "" if margin is None else f" (the closest margin is {row_metric(closest).format_margin(margin)})"
        raise TrackingError(f"no ticket matches: no round of the {len(rows)} matched its dense network{hint}")
    return ends[(best.trial_id, best.round)]  # type: ignore[union-attr]
