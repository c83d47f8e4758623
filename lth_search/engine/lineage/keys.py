"""Stage identity: the key inputs of every stage, and the only module that builds a key.

A lineage is a chain of stages, each keyed by the sha256 of the canonical JSON of
everything that determines its output, its parent's key included (ARCHITECTURE.md,
"Stages and reuse"). Keeping every stage's inputs here, beside each other, is what lets a
reader check that two stages which compute the same thing share a key and two that
compute different things do not (tests/engine/test_keys.py proves by reading the
package's source that no other module calls `content_key`).

- dense: data content, model, resolved recipe, seed, the rewind steps kept. The dense
  replicates (the verdict's baseline) are dense stages with seeds seed+1, seed+2, ...
- round (imp, lr_rewind, finetune): the parent's key and the round's pruning choices.
- at_sparsity (oneshot, snip, grasp, synflow): the dense key and the IMP round's sparsity.
- control (random_prune, random_reinit): the IMP round's key and the control's seed.
- stability, dense_stability, perturbation: the probed stage's key and the probe's knobs.

One key, one result: what changes a stage's numbers is in its key, and how a stage is
trained (alone or in a pack of any size) is not, because it does not change the bytes
(engine/packs.py, "One key, one result"). The manifest records torch's version, the
device type and the dtype beside the key (`provenance`).
"""

from __future__ import annotations

from typing import Any

import torch

from lth_search.store.content_keys import content_key

STAGE_FORMAT = 5
"""Bumped when the meaning of a stage's inputs or outputs changes: old keys stop matching.
2: stages keep per-example val correctness (`val_correct`) for the paired verdict.
3: a lone stage is trained by the pack trainer's arithmetic (bytes independent of packs);
   probes share the format (they had their own `format: 1`).
4: stages keep per-example val losses (weight set `val`, tensor `loss`) and `val_loss` /
   `test_loss`, so a verdict can judge loss or perplexity (engine/lineage/metric.py).
5: mostly-zero weights (a pruned round's) are stored as values plus a bit-packed mask
   (store/codec.py), so a stage costs its non-zeros; an older lth-search would read the
   parts as tensors of their own, so the new layout takes new keys.

The metric a lineage is judged on (`search.metric`) is not a key input, on purpose: every
stage stores the per-example values of every metric (correctness bits and losses), so a
stage's output does not depend on the metric, and one stored stage serves lineages judged
on accuracy and on loss alike. Only the verdict (walk.py), which is recomputed from the
stored values whenever a lineage is walked, reads the metric."""

Inputs = dict[str, Any]


def stage_key(inputs: Inputs) -> str:
    """The key of a stage with these inputs."""
    return content_key(inputs)


def dense_inputs(data: dict, data_fingerprint: str, model: dict, recipe: dict, seed: int,
                 rewind_steps: list[int]) -> Inputs:
    """The dense stage trained with `seed` (replicate 0 is the lineage's own seed)."""
    return {"stage": "dense", "format": STAGE_FORMAT, "data": data, "data_fingerprint": data_fingerprint,
            "model": model, "recipe": recipe, "seed": seed, "rewind_steps": rewind_steps}


def round_inputs(parent_key: str, round_index: int, choices: dict, kind: str = "imp",
                 fixed_lr: float | None = None) -> Inputs:
    """Round `round_index` of an iterative kind after `parent_key` (dense or round r-1).

    IMP rounds carry no kind (their keys predate kinds); fine-tuning under a constant
    schedule is learning-rate rewinding and takes its keys (`kind` "lr_rewind", no rate).
    """
    inputs: Inputs = {"stage": "round", "format": STAGE_FORMAT, "parent": parent_key, "round": round_index,
                      "choices": choices}
    if kind != "imp":
        inputs["kind"] = kind
    if fixed_lr is not None:
        inputs["fixed_lr"] = fixed_lr
    return inputs


def at_sparsity_inputs(kind: str, dense_key: str, round_index: int, sparsity: float, choices: dict,
                       probe_size: int | None = None) -> Inputs:
    """A kind trained at an IMP round's sparsity from the dense stage (oneshot, prune-at-init)."""
    inputs: Inputs = {"stage": "kind", "format": STAGE_FORMAT, "kind": kind, "dense": dense_key,
                      "round": round_index, "sparsity": sparsity, "choices": choices}
    if probe_size is not None:
        inputs["probe_size"] = probe_size
    return inputs


def control_inputs(ticket_key: str, kind: str, seed: int) -> Inputs:
    """A control of the IMP round `ticket_key`: same per-layer counts, random positions or a fresh init."""
    return {"stage": "control", "format": STAGE_FORMAT, "parent": ticket_key, "kind": kind, "seed": seed}


def stability_inputs(round_key: str, points: int, data_seed: int) -> Inputs:
    """A second copy of a round from theta_k with another data order (linear-mode connectivity)."""
    return {"stage": "stability", "format": STAGE_FORMAT, "parent": round_key, "points": points,
            "data_seed": data_seed}


def dense_stability_inputs(dense_key: str, step: int, points: int, data_seed: int) -> Inputs:
    """Two dense copies from theta_step with different data orders."""
    return {"stage": "dense_stability", "format": STAGE_FORMAT, "parent": dense_key, "step": step,
            "points": points, "data_seed": data_seed}


def perturbation_inputs(round_key: str, epsilon: float, seed: int) -> Inputs:
    """A round retrained from theta_k plus relative noise on its kept weights."""
    return {"stage": "perturbation", "format": STAGE_FORMAT, "parent": round_key, "epsilon": epsilon, "seed": seed}


def lineage_identity(data: dict, model: dict, recipe: dict, prune: dict, seed: int) -> str:
    """One hash of everything a lineage's stages depend on (not where outputs go): equal for a
    rerun, so `lth-search lineage` run twice finds its MLflow run again."""
    return content_key({"data": data, "model": model, "train": recipe, "prune": prune, "seed": seed})


def recipe_identity(recipe: dict) -> str:
    """One hash of a searched recipe, whatever its place among the candidates and whether a
    number came as 100 or 100.0 (one recipe, as confirmation.py `_same` judges): names the
    confirmation's runs alike wherever they start (search/panel_runs.py)."""
    return content_key({key: float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
                        for key, value in recipe.items()})


def provenance(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """What the manifest records of how a stage was computed: the same key stores the same
    bytes for one (device type, dtype); torch's version says which kernels rounded them."""
    return {"torch": torch.__version__, "device": torch.device(device).type, "dtype": str(dtype).removeprefix("torch.")}
