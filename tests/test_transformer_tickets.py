"""A built-in Transformer's ticket from `best --out` is plain PyTorch: torch.nn.utils.prune applies it."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from torch.nn.utils import prune

from fault_helpers import run_cli
from search_helpers import search_config

from lth_search.engine.data import load_dataset
from lth_search.portable.architectures import build_architecture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_transformer_ticket_applies_with_custom_from_mask(ray_local, data_root, tmp_path):
    """Acceptance 3 of issue 20: the masks of `best --out` (attention in_proj_weight, out_proj, MLP,
    embedding, head) go onto the same module names with custom_from_mask, and the network
    gives the val accuracy the search reported."""
    from lth_search.api import run_search

    cfg = search_config(data_root, tmp_path, {
        "name": "transformer-ticket", "model.name": "transformer", "model.d_model": 8, "model.heads": 2,
        "model.layers": 1, "model.ff_width": 16, "model.patch": 4, "model.prune_embeddings": "true",
        "train.steps": 100, "prune.rounds": 2, "prune.rewind_steps": "[0, 20]", "search.num_trials": 2,
        "search.space.rewind_step": "[0]", "search.space.layer_ratios": "{attn: [1.0, 0.5]}",
        "search.asha.enabled": "false", "search.tolerance": 0.5, "tracking.enabled": "true",
    })
    run_search(cfg, progress=lambda line: None)
    code, _, err = run_cli(["best", "--tracking-uri", cfg.tracking_uri(), "--experiment", cfg.name,
                            "--min-sparsity", "0.3", "--out", str(tmp_path / "ticket")])
    assert code == 0, err
    folder = tmp_path / "ticket"
    card = json.loads((folder / "ticket.json").read_text())
    masks = safetensors.torch.load_file(str(folder / "mask.safetensors"))
    assert {"layers.0.self_attn.in_proj_weight_mask", "layers.0.self_attn.out_proj.weight_mask",
            "layers.0.linear1.weight_mask", "embed.weight_mask", "output.weight_mask"} <= set(masks)

    model = build_architecture("transformer", tuple(card["input_shape"]), card["num_classes"], d_model=8, heads=2,
                               layers=1, ff_width=16, patch=4)
    model.load_state_dict(safetensors.torch.load_file(str(folder / "trained.safetensors")))
    for key, mask in masks.items():
        module, _, weight = key.removesuffix("_mask").rpartition(".")
        prune.custom_from_mask(model.get_submodule(module), weight, mask)
    attention = model.get_submodule("layers.0.self_attn")
    assert isinstance(attention.in_proj_weight_orig, torch.nn.Parameter)
    assert torch.count_nonzero(attention.in_proj_weight[masks["layers.0.self_attn.in_proj_weight_mask"] == 0]) == 0
    val = load_dataset(cfg.data, cfg.seed).val
    model.eval()
    with torch.no_grad():
        accuracy = int((model(val.x).argmax(dim=1) == val.y).sum()) / len(val)
    assert accuracy == pytest.approx(card["val_accuracy"], abs=1e-9)
    import mlflow

    runs = mlflow.MlflowClient(cfg.tracking_uri()).search_runs(
        [mlflow.MlflowClient(cfg.tracking_uri()).get_experiment_by_name(cfg.name).experiment_id],
        filter_string=f"tags.`lth.trial_id` = '{card['trial_id']}'")
    logged = runs[0].data.metrics  # the latest round's per-group sparsity, as MLflow shows it
    assert {"group_sparsity/attn", "group_sparsity/mlp", "group_sparsity/embed", "group_sparsity/output"} <= set(logged)
    assert logged["group_sparsity/mlp"] > 0.3
    sparsity = 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert sparsity == pytest.approx(card["sparsity"]) and card["sparsity"] > 0.3
