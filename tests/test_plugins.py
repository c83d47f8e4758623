"""Your own model and data: `package.module:factory` targets through a whole search, store and tickets.

The model and the data set live in tests/custom_parts.py (a module on the path of the
test session and so of its Ray workers). Layer groups are found automatically (conv,
fc, output); a 2-trial search on the session's Ray runs through them, and the best
ticket comes back from MLflow with its trained network.
"""

from __future__ import annotations

import pytest
import torch
from conftest import REPO
from fault_helpers import one_line_error, run_cli
from search_helpers import search_config

from lth_search.engine.data import load_dataset
from lth_search.engine.models import build_model
from lth_search.engine.train import evaluate
from lth_search.errors import ConfigError
from lth_search.api import run_search
from lth_search.tracking.ticket_reader import best_ticket

MODEL, DATA = "custom_parts:tiny_conv", "custom_parts:wave_data"
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def test_plugin_model_gets_layer_groups_and_a_seeded_init(data_root, tmp_path):
    cfg = search_config(data_root, tmp_path, {"model.name": MODEL, "data.name": DATA, "data.val_size": 100})
    data = load_dataset(cfg.data, cfg.seed)
    assert (data.input_shape, data.num_classes, len(data.train), len(data.val)) == ((1, 24), 3, 500, 100)
    model = build_model(cfg.model, data.input_shape, data.num_classes, seed=3)
    assert model.prunable == {"features.0.weight": "conv", "hidden.weight": "fc", "head.weight": "output"}
    state = torch.get_rng_state()
    again = build_model(cfg.model, data.input_shape, data.num_classes, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ConfigError, match=r"^model\.name: cannot import 'custom_parts:nothing_here'"):
        build_model(cfg.model.model_copy(update={"name": "custom_parts:nothing_here"}), (1, 24), 3, 0)


@pytest.mark.slow
def test_search_through_plugin_targets_fetches_its_best_ticket(ray_local, data_root, tmp_path):
    cfg = search_config(data_root, tmp_path, {
        "name": "plugins", "model.name": MODEL, "data.name": DATA, "data.val_size": 100, "search.num_trials": 2,
        "search.asha.enabled": "false", "tracking.enabled": "true", "prune.rounds": 2, "search.tolerance": 0.1,
        "search.space.layer_ratios": "{conv: [0.5, 1.0]}",
    })
    summary = run_search(cfg, progress=lambda _: None)
    assert summary["finished"] == 2
    ticket = best_ticket(experiment="plugins", tracking_uri=cfg.tracking_uri())
    assert ticket.config.model.name == MODEL and set(ticket.mask) == {"features.0.weight", "hidden.weight", "head.weight"}
    assert ticket.sparsity > 0 and ticket.extra["model_uri"] == "models:/plugins@best"
    data = load_dataset(cfg.data, cfg.seed)
    assert evaluate(ticket.trained_model(), data.test, 1000) == ticket.test_accuracy


@pytest.mark.parametrize(("field", "target", "needle"), [
    ("data.name", "os:remove", "standard library"),
    ("data.name", "shutil:rmtree", "standard library"),
    ("model.name", "os:system", "standard library"),
    ("data.name", "custom_parts:delete_root", "not marked as a plug-in"),
    ("model.name", "custom_parts:unmarked_conv", "not marked as a plug-in"),
])
def test_a_config_calls_only_marked_plugins(field, target, needle, data_root, tmp_path, monkeypatch):
    """A shared config naming any importable function must not run it (issue 22 item 1)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file.txt").write_text("keep me")
    root = victim / "file.txt" if target != "shutil:rmtree" else victim
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["lineage", QUICKSTART, "--set", f"{field}={target}", "--set", f"data.root={root}",
                            "--set", f"output_dir={tmp_path / 'out'}", "--no-track"])
    assert one_line_error(code, err, 2, needle) is None, err
    assert field in err and (victim / "file.txt").read_text() == "keep me"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"model.name": "custom_parts:broken_model"}, "model.name: custom_parts:broken_model failed (RuntimeError"),
    ({"model.name": "custom_parts:wide_conv"}, "outputs shaped (2, 6)"),
    ({"data.name": "custom_parts:stray_label_data"}, "never occur in the training split"),
])
def test_plugin_parts_that_do_not_fit_are_refused(overrides, needle, data_root, tmp_path, monkeypatch):
    """A raising factory, 3 logits too many, a stray label: one line, exit 2 (issue 22 items 8, 9)."""
    sets = {"model.name": MODEL, "data.name": DATA, "data.val_size": 100, **overrides}
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["lineage", QUICKSTART, *(a for k, v in sets.items() for a in ("--set", f"{k}={v}")),
                            "--set", f"output_dir={tmp_path / 'out'}", "--no-track"])
    assert one_line_error(code, err, 2, needle) is None, err
