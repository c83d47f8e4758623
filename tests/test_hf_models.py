"""Pretrained transformers models with LoRA: θ0 = the checkpoint, base or adapters pruned, tickets portable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch.nn.utils import prune

from fault_helpers import run_cli
from hf_helpers import tiny_lm_data, tiny_text_task
from search_helpers import trial_results

from lth_search.config import ModelConfig, load_config
from lth_search.engine.data import load_dataset
from lth_search.engine.models import build_model
from lth_search.engine.packs import choose_mode
from lth_search.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    return tiny_text_task(tmp_path_factory.mktemp("hf"))


def lora_model(task, target: str = "base", seed: int = 0):
    cfg = ModelConfig(name=f"hf:{task['model']}", lora={"r": 4, "alpha": 8}, prune_target=target)
    return build_model(cfg, (12,), 2, seed)


def test_theta0_is_the_checkpoint_and_the_target_chooses_what_is_pruned(task):
    from transformers import AutoModelForCausalLM

    base = lora_model(task, "base")
    pretrained = AutoModelForCausalLM.from_pretrained(str(task["model"]), local_files_only=True).state_dict()
    state = base.state_dict()
    q = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert torch.equal(state[q], pretrained["model.layers.0.self_attn.q_proj.weight"])
    assert base.prunable[q] == "attn" and base.prunable["base_model.model.model.layers.1.mlp.down_proj.weight"] == "mlp"
    assert base.prunable["base_model.model.score.modules_to_save.default.weight"] == "output"
    assert not [n for n in base.prunable if "lora_" in n or "original_module" in n or "norm" in n]
    adapters = lora_model(task, "lora")
    assert sorted(set(adapters.prunable.values())) == ["attn"] and len(adapters.prunable) == 8
    assert all(".lora_A." in n or ".lora_B." in n for n in adapters.prunable)
    assert [p.requires_grad for n, p in base.named_parameters() if n == q] == [False]  # LoRA freezes the base
    again, other = lora_model(task, seed=0).state_dict(), lora_model(task, seed=1).state_dict()
    head = "base_model.model.score.modules_to_save.default.weight"
    assert all(torch.equal(state[k], again[k]) for k in state) and not torch.equal(state[head], other[head])
    assert base(torch.tensor([[5, 6, 7, 0, 0]])).shape == (1, 2)
    assert choose_mode(base, "cuda") == "sequential"  # vmap cannot stack its non-persistent rotary buffers


def test_a_hub_id_without_a_local_copy_names_the_command(tmp_path):
    with pytest.raises(ConfigError, match=r"run `hf download Qwen/Qwen2.5-3B --local-dir DIR`"):
        build_model(ModelConfig(name="hf:Qwen/Qwen2.5-3B"), (8,), 2, 0)
    with pytest.raises(ConfigError, match="config.json missing"):
        build_model(ModelConfig(name=f"hf:{tmp_path}"), (8,), 2, 0)
    with pytest.raises(ValueError, match="prune_target: lora needs model.lora"):
        ModelConfig(name=f"hf:{tmp_path}", prune_target="lora")


def test_lora_search_ticket_applies_with_torch_prune(task, ray_local, tmp_path):
    """Acceptance 2 of issue 20 (classification head: the verdict judges accuracy): a 3-trial
    LoRA search of 2 rounds each on CPU; `best --out`'s masks on the same model built with
    transformers and peft, through torch.nn.utils.prune, give the reported val accuracy."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from lth_search.api import run_search

    cfg = load_config(None, [
        "name=qwen-lora", "data.name=text", f"data.root={task['data']}", f"data.tokenizer={task['tokenizer']}",
        "data.max_length=12", "data.val_size=48", f"model.name=hf:{task['model']}",
        "model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}", "model.prune_target=lora",
        "train.optimizer=adam", "train.lr=0.01", "train.batch_size=16", "train.steps=40", "train.device=cpu",
        "prune.rounds=2", "prune.patience=99", "prune.dense_replicates=1", "prune.rewind_steps=[0, 5]",
        "search.num_trials=3", "search.max_concurrent=2", "search.confirm_seeds=0", "search.asha.enabled=false",
        "search.space.rate=[0.2, 0.5]", "search.space.rewind_step=[0, 5]", "search.tolerance=0.5",
        f"output_dir={tmp_path}", "resources.cpu=1",
    ]).absolute()
    summary = run_search(cfg, progress=lambda line: None)
    histories = trial_results(summary["results_path"])
    assert summary["trials"] == summary["finished"] == 3
    assert sorted(len(rows) for rows in histories.values()) == [2, 2, 2]  # one report per round
    code, out, err = run_cli(["best", "--tracking-uri", cfg.tracking_uri(), "--experiment", "qwen-lora",
                              "--min-sparsity", "0.3", "--out", str(tmp_path / "ticket"), "--json"])
    assert code == 0, err
    card = json.loads((tmp_path / "ticket" / "ticket.json").read_text())
    assert card["round"] == 2 and card["sparsity"] > 0.3

    # The same model, built by a user with transformers and peft alone.
    model = AutoModelForSequenceClassification.from_pretrained(str(task["model"]), num_labels=2, local_files_only=True)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    model.load_state_dict(safetensors.torch.load_file(str(tmp_path / "ticket" / "trained.safetensors")))
    masks = safetensors.torch.load_file(str(tmp_path / "ticket" / "mask.safetensors"))
    assert masks and all(".lora_A." in k or ".lora_B." in k for k in masks)
    for key, mask in masks.items():
        module, _, weight = key.removesuffix("_mask").rpartition(".")
        prune.custom_from_mask(model.get_submodule(module), weight, mask)
        assert torch.count_nonzero(model.get_submodule(module).weight[mask == 0]) == 0
    val = load_dataset(cfg.data, cfg.seed).val
    model.eval()
    with torch.no_grad():
        predicted = model(input_ids=val.x, attention_mask=(val.x != 0).long()).logits.argmax(dim=1)
    assert int((predicted == val.y).sum()) / len(val) == pytest.approx(card["val_accuracy"], abs=1e-9)


def test_a_causal_lm_lineage_is_judged_on_perplexity(task, tmp_path, capsys):
    """Issue 20 item 5: a tiny random Qwen2 causal LM (LoRA adapters pruned) on Alpaca-style data
    runs a lineage judged on per-example loss, reported as perplexity (lower is better); MLflow,
    `lth-search tickets` and `best --json` name the metric and its direction."""
    import math

    import mlflow

    from lth_search.api import run_lineage_command
    from lth_search.cli import main

    lm = tiny_lm_data(tmp_path)
    cfg = load_config(None, [
        "name=qwen-lm", "data.name=text_lm", f"data.root={lm['data']}", f"data.tokenizer={lm['tokenizer']}",
        "data.max_length=48", "data.val_size=16", "data.test_size=16", f"model.name=hf:{task['model']}",
        "model.head=causal_lm", "model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
        "model.prune_target=lora", "train.optimizer=adam", "train.lr=0.02", "train.batch_size=8", "train.steps=30",
        "train.device=cpu", "prune.rounds=2", "prune.patience=99", "prune.dense_replicates=2",
        "prune.rewind_steps=[0]", "search.tolerance=0.05", f"output_dir={tmp_path / 'out'}",
    ]).absolute()
    lines: list[str] = []
    result = run_lineage_command(cfg, progress=lines.append)
    assert result.metric == "perplexity" and result.failed is None and len(result.rounds) == 2
    dense = result.dense
    assert dense.val_loss < math.log(256)  # below the uniform prediction over Qwen's 256 logits: it trained
    for r in result.rounds:  # the margin is the paired loss difference, positive = lower loss than dense
        assert r.margin == pytest.approx(dense.baseline_val_loss - r.val_loss, abs=1e-5)
        assert r.matches == (r.margin - 1.2816 * r.margin_se >= -0.05 - 1e-12)
    assert any(line.startswith("dense ") and "val_perplexity" in line for line in lines)

    client = mlflow.MlflowClient(cfg.tracking_uri())
    [run] = client.search_runs([client.get_experiment_by_name("qwen-lm").experiment_id])
    assert run.data.tags["lth.metric"] == "perplexity"
    assert run.data.metrics["dense_val_perplexity"] == pytest.approx(math.exp(dense.val_loss))

    assert main(["tickets", "--tracking-uri", cfg.tracking_uri(), "--experiment", "qwen-lm"]) == 0
    table = capsys.readouterr().out
    assert "judged on perplexity (minimize" in table and "val_perplexity" in table
    assert main(["best", "--tracking-uri", cfg.tracking_uri(), "--experiment", "qwen-lm", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    chosen = next(r for r in result.rounds if r.round == best["round"])
    assert best["metric"] == "perplexity" and best["direction"] == "minimize"
    assert best["val_perplexity"] == pytest.approx(math.exp(chosen.val_loss))
    assert best["dense_val_perplexity"] == pytest.approx(math.exp(dense.val_loss))
    assert main(["best", "--tracking-uri", cfg.tracking_uri(), "--experiment", "qwen-lm"]) == 0
    assert f"val_perplexity {best['val_perplexity']:.4g} (dense" in capsys.readouterr().out

    # What a search trial would report, and the console line made from it, name perplexity too.
    from types import SimpleNamespace

    from lth_search.runs.record import TrialStatus
    from lth_search.runs.trial import round_report
    from lth_search.search.console import SearchConsole

    report = round_report(result, result.rounds[-1], attempt=1)
    matching = next((r for r in result.rounds if r.round == result.best.round), result.dense)
    assert report["metric"] == "perplexity"
    assert report["matching_val_perplexity"] == pytest.approx(math.exp(matching.val_loss))
    said: list[str] = []
    SearchConsole(3, said.append).ended(SimpleNamespace(trial_id="t1", last_result=report), TrialStatus.FINISHED)
    assert said[0].endswith(f"val perplexity {report['matching_val_perplexity']:.4g})"), said
