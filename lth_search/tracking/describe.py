"""What makes a run readable in the MLflow UI: its source, description and data set.

`MlflowClient.create_run` sets none of what the fluent `mlflow.start_run` fills in from
its context (source, git commit, user), so the runs table's Source column stays empty
and nobody can tell which code produced a run. These helpers supply them, plus a
description saying what the run is and the data set as a run input (the Dataset
column), whose digest is the data fingerprint the stage keys hash.
"""

from __future__ import annotations

import getpass
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from lth_search.config import ExperimentConfig
from lth_search.tracking.layout import OPTUNA_TRIAL, SEARCH_ID

DIGEST_CHARS = 32
"""MLflow keeps at most 36 characters of a dataset digest; 32 hex digits are 128 bits."""


@lru_cache(maxsize=1)
def source_tags() -> dict[str, str]:
    """Source name and type, user, lth-search version and, for a git checkout, its commit."""
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

    from lth_search import __version__

    package = str(Path(__file__).resolve().parents[1])
    tags = {
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": f"lth-search {__version__}",
        "lth.version": __version__,
    }
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no user name in a container without /etc/passwd entry
        pass
    git = {"mlflow.source.git.commit": get_git_commit(package), "mlflow.source.git.branch": get_git_branch(package),
           "mlflow.source.git.repoURL": get_git_repo_url(package)}
    tags.update({key: value for key, value in git.items() if value})
    return tags


def search_tags(search_id: str | None, optuna_trial: int | None) -> dict[str, str]:
    """The tags tying a child run to its search and its Optuna trial."""
    tags = {SEARCH_ID: str(search_id)} if search_id else {}
    if optuna_trial is not None:
        tags[OPTUNA_TRIAL] = str(optuna_trial)
    return tags


def run_description(cfg: ExperimentConfig, role: str, choices: dict[str, Any] | None = None) -> str:
    """The run's description (MLflow's `mlflow.note.content`, shown on the run page)."""
    what = f"`{cfg.model.name}` on `{cfg.data.name}`, {cfg.prune.rounds} rounds of IMP, rewind to step "
    if role == "search":
        return (f"lth-search search `{cfg.name}`: {cfg.search.num_trials} IMP lineages of {what}"
                f"k from the search space. Children: one run per lineage. Tickets: `tickets.csv`; "
                f"best ticket: `models:/{cfg.name}@best`.")
    picked = ", ".join(f"{k}={v}" for k, v in (choices or {}).items()) or "the config's choices"
    kind = "One search trial: an IMP lineage" if role == "trial" else "An `lth-search lineage` run: an IMP lineage"
    return (f"{kind} of {what}{cfg.prune.rewind_step}, choices: {picked}. "
            f"Per round (step = round): accuracies, sparsity, mask and trained weights; "
            f"`by_sparsity/*` charts accuracy against sparsity (step = sparsity in permille, dense at 0).")


def data_input(cfg: ExperimentConfig, fingerprint: str) -> Any:
    """The data set as an MLflow run input: name, digest = fingerprint, where it was read from."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    profile = {"fingerprint": fingerprint, "seed": cfg.seed, "val_size": cfg.data.val_size,
               "normalize": cfg.data.normalize}
    dataset = Dataset(
        name=cfg.data.name, digest=fingerprint[:DIGEST_CHARS], source_type="local",
        source=json.dumps({"uri": str(Path(cfg.data.root).expanduser())}), profile=json.dumps(profile),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])
