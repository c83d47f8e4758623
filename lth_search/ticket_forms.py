"""A ticket's trained network in an inference form: what `best --out DIR --format F` and the
registered model write (the files and the torch-only loader: portable/export.py).

- `dense`: the network as trained, pruned entries zero;
- `csr` / `bsr`: every pruned layer as a sparse matrix (portable/sparse.py);
- `structured`: the units no output depends on cut out, a smaller dense network
  (portable/structured.py; chain models only);
- the registered model: the form measured fastest for its shapes on the logging machine's
  device type (`measured_form`), at the batch `tracking.serve_batch`.

`model_spec` is `model.json`'s description of the network (a built-in architecture and
its options, or a plug-in factory), shared by both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lth_search.engine.models import NAMES
from lth_search.engine.plugins import MODEL_GROUP, resolve
from lth_search.errors import ConfigError
from lth_search.portable.architectures import TRANSFORMER_OPTIONS
from lth_search.portable.export import EXPORT_FORMATS, form_of, write_form
from lth_search.portable.sparse import choose_formats, chosen_plan, semi_structured_available
from lth_search.portable.structured import STRUCTURED_ARCHITECTURES
from lth_search.portable.ticket_model import build_network
from lth_search.tickets import Ticket


def plugin_factory(ticket: Ticket) -> Any:
    """The factory of a plug-in model (None for a built-in one)."""
    name = ticket.config.model.name
    return None if name in NAMES else resolve("model.name", "model", name, MODEL_GROUP, NAMES)


def model_spec(ticket: Ticket, normalization: dict[str, list[float]] | None) -> dict[str, Any]:
    """`model.json` of the served model (see portable/ticket_model.py)."""
    model = ticket.config.model
    spec: dict[str, Any] = {"input_shape": list(ticket.input_shape), "num_classes": ticket.num_classes}
    factory = plugin_factory(ticket)
    if factory is None:
        options = {"widths": list(model.widths), "width": model.width, "batch_norm": model.batch_norm}
        options.update({key: getattr(model, key) for key in TRANSFORMER_OPTIONS})
        spec.update(architecture=model.name, options=options)
    else:
        spec["factory"] = f"{factory.__module__}:{factory.__qualname__}"
    if normalization is not None:
        spec["normalization"] = normalization
    return spec


def check_format(ticket: Ticket, fmt: str) -> None:
    """ConfigError (one line) for a format this ticket cannot be written in."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "structured" and ticket.config.model.name not in STRUCTURED_ARCHITECTURES:
        raise ConfigError(f"--format structured: model {ticket.config.model.name!r} has no plain chain of layers to "
                          f"shrink; structured export handles {', '.join(STRUCTURED_ARCHITECTURES)} "
                          "(use csr or bsr)")
    if ticket.trained_weights is None:
        raise ConfigError(f"--format {fmt}: run {ticket.run_id} round {ticket.round} logged no trained weights")


def trained_network(ticket: Ticket, spec: dict[str, Any]) -> torch.nn.Module:
    model = build_network(spec)
    model.load_state_dict(ticket.trained_weights)
    return model.eval()


def export_ticket(ticket: Ticket, folder: str | Path, fmt: str | None) -> Path:
    """`ticket.save(folder)`, plus the trained network in form `fmt` with its loader (None: the
    standard files only). A sparse or structured form replaces `trained.safetensors`."""
    if fmt is None:
        return ticket.save(folder)
    check_format(ticket, fmt)
    spec = model_spec(ticket, ticket.normalization)
    formed, formed_spec = form_of(trained_network(ticket, spec), spec, fmt)
    return ticket.save(folder, form=lambda staging: write_form(staging, formed, formed_spec), trained=fmt == "dense")


def measured_form(ticket: Ticket, spec: dict[str, Any], example: torch.Tensor
                  ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained network in the form measured fastest for `example` (a batch of standardised
    inputs) on this machine's device type (one CPU thread), and its spec (with what was measured)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = trained_network(ticket, spec).to(device)
    formats = ("csr", "bsr", "semi_structured") if semi_structured_available() else ("csr", "bsr")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the served form per core; steady timings on a shared machine
    try:
        chosen, spent = choose_formats(model, example.to(device), formats)
    finally:
        torch.set_num_threads(threads)
    formed, formed_spec = form_of(model, spec, chosen)
    best = chosen_plan(spent)
    formed_spec["measured"] = {"device": device.type, "batch": int(example.shape[0]), "chosen": best,
                               "seconds_per_batch": spent, "threads": 1}
    return formed, formed_spec
