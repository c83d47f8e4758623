"""lth-search: distributed hyperparameter search for the Lottery Ticket Hypothesis.

    from lth_search import best_ticket
    t = best_ticket(experiment="quickstart", max_accuracy_drop=0.01)
    net = t.trained_model()      # the trained sparse network, for inference
    start = t.rewound_model()    # the ticket to retrain: θk, mask applied

Names are resolved lazily so `import lth_search` pulls in neither Ray nor MLflow.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": "lth_search.config",
    "ExperimentConfig": "lth_search.config",
    "run_lineage": "lth_search.engine.lineage",
    "run_search": "lth_search.api",
    "resume_search": "lth_search.api",
    "sync_search": "lth_search.api",
    "best_ticket": "lth_search.api",
    "list_tickets": "lth_search.api",
    "Ticket": "lth_search.tickets",
    "LthError": "lth_search.errors",
    "plugin": "lth_search.engine.plugins",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lth_search' has no attribute {name!r}")
