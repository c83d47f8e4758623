"""A ticket's trained network in its inference forms (issue 23): CSR/BSR exports, the structured
(smaller dense) export, their torch-only loader, and the measured choice of form.

No search is needed: a LeNet-300-100-shaped ticket is built here with real magnitude-pruned
weights; the truth is the ticket's own dense trained network.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lth_search.config import load_config
from lth_search.engine.models import build_model
from lth_search.errors import ConfigError
from lth_search.portable.sparse import choose_formats, chosen_plan, sparsify
from lth_search.ticket_forms import export_ticket, measured_form, model_spec
from lth_search.tickets import Ticket

warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
SHAPE = (1, 8, 8)


def _ticket(model_name: str = "lenet_300_100", density: float = 0.1) -> Ticket:
    cfg = load_config(None, [f"model.name={model_name}"])
    state = {k: v.clone() for k, v in build_model(cfg.model, SHAPE, 10, 0).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    mask = {}
    for name in [k for k in state if k.endswith("weight") and state[k].dim() > 1]:
        mask[name] = torch.rand(state[name].shape, generator=generator) < density
        state[name] = state[name] * mask[name]
    return Ticket(run_id="r", round=3, sparsity=1 - density, metrics={"val_accuracy": 0.5, "test_accuracy": 0.5},
                  params={}, config=cfg, mask=mask, rewind_weights=state, trained_weights=state, input_shape=SHAPE,
                  num_classes=10)


LOAD = """
import importlib, json, sys, torch
x, out = torch.load(sys.argv[1]), {}
for folder in sys.argv[2:]:  # each export by its own load_ticket.py
    sys.path.insert(0, folder)
    for name in [m for m in sys.modules if m == "load_ticket" or m.startswith("lth_portable")]:
        del sys.modules[name]
    net = importlib.import_module("load_ticket").load()
    sys.path.remove(folder)
    with torch.no_grad():
        out[folder] = {"logits": net(x).tolist(), "layers": [type(m).__name__ for m in net.modules()]}
out["lth"] = sorted({m.split(".")[0] for m in sys.modules if m.startswith("lth_")})
print(json.dumps(out))
"""


def _load_in_folders(folders: list[Path], x: torch.Tensor) -> dict:
    """The exports loaded by their own load_ticket.py in one fresh interpreter (-I: nothing on the
    path but the folders' bundled code and the venv's packages)."""
    torch.save(x, folders[0].parent / "x.pt")
    done = subprocess.run([sys.executable, "-I", "-W", "ignore", "-c", LOAD, str(folders[0].parent / "x.pt"),
                           *map(str, folders)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_every_export_form_predicts_what_the_dense_ticket_predicts(tmp_path: Path) -> None:
    ticket = _ticket()
    # 60 first-layer neurons that no second-layer weight reads, and 20 that read nothing: structured cuts them
    ticket.trained_weights["hidden.1.weight"][:, :60] = 0
    ticket.trained_weights["hidden.0.weight"][100:120] = 0
    x = torch.randn(16, *SHAPE)
    with torch.no_grad():
        reference = ticket.trained_model()(x)
    forms = {"csr": "SparseLinear", "bsr": "SparseLinear", "structured": "Linear", "dense": "Linear"}
    folders = {fmt: export_ticket(ticket, tmp_path / fmt, fmt) for fmt in forms}
    loaded = _load_in_folders(list(folders.values()), x)
    assert loaded["lth"] == ["lth_portable"]  # the bundled code only
    sizes = {}
    for fmt, layer in forms.items():
        folder = folders[fmt]
        logits = torch.tensor(loaded[str(folder)]["logits"])
        assert torch.allclose(logits, reference, atol=1e-5), fmt
        assert torch.equal(logits.argmax(1), reference.argmax(1)), fmt
        assert layer in loaded[str(folder)]["layers"], fmt
        spec = json.loads((folder / "model.json").read_text())
        assert spec["format"] == fmt
        assert (folder / "trained.safetensors").exists() == (fmt == "dense")
        sizes[fmt] = (folder / "weights.safetensors").stat().st_size
        if fmt == "structured":
            widths = spec["options"]["widths"]
            assert spec["architecture"] == "mlp" and widths[0] <= 300 - 60 - 20 + 1 and widths[0] < 300
    assert sizes["csr"] < 0.3 * sizes["dense"] and sizes["structured"] < sizes["dense"]


def test_structured_export_of_a_residual_network_is_a_one_line_error(tmp_path: Path) -> None:
    ticket = _ticket("resnet20")
    ticket.input_shape = (3, 8, 8)
    with pytest.raises(ConfigError, match="--format structured: model 'resnet20'.*use csr or bsr"):
        export_ticket(ticket, tmp_path / "t", "structured")
    assert not (tmp_path / "t").exists()


def test_measured_form_is_sparse_only_where_it_pays(tmp_path: Path) -> None:
    ticket = _ticket(density=0.03)
    spec = model_spec(ticket, None)
    formed, formed_spec = measured_form(ticket, spec, torch.randn(64, *SHAPE))
    measured = formed_spec["measured"]
    assert measured["batch"] == 64 and measured["device"] == "cpu"
    times = measured["seconds_per_batch"]
    chosen = measured["chosen"]
    assert chosen in times and (chosen == "dense" or times[chosen] <= 0.9 * times["dense"])
    assert (formed_spec["format"] == "dense") == (chosen == "dense") == (formed_spec["layers"] == {})
    # what is chosen is a plan of real layers; a dense-only model has nothing to choose
    assert set(formed_spec["layers"]) <= {"hidden.0", "hidden.1", "output"}
    dense_model = ticket.trained_model()
    for weight in (dense_model.hidden[0].weight, dense_model.hidden[1].weight, dense_model.output.weight):
        weight.data.fill_(1.0)
    assert choose_formats(dense_model, torch.randn(4, *SHAPE)) == ({}, {})
    # a sparse plan only 5 % faster is timing noise: the rule the spec reports is the rule that chose
    assert chosen_plan({"dense": 1.0, "csr": 0.95}) == "dense"
    assert chosen_plan({"dense": 1.0, "csr": 0.5, "bsr": 0.7}) == "csr"
    # a sparse form computes the same function
    x = torch.randn(8, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(sparsify(ticket.trained_model(), "csr")(x), ticket.trained_model()(x), atol=1e-5)


def test_a_rounds_latency_timing_is_a_share_of_its_training_at_most_the_budget() -> None:
    """Issue 24: at 0.2 s a round the timing was most of a tiny lineage's time."""
    from lth_search.engine.lineage.results import RoundResult
    from lth_search.tracking.round_metrics import inference_budget

    tracking = load_config(None, []).tracking
    assert (tracking.inference_share, tracking.inference_budget_s) == (0.1, 0.2)

    def round_of(steps: int, steps_per_s: float) -> RoundResult:
        return RoundResult(val_accuracy=0.9, test_accuracy=0.9, train_loss=0.1, train_steps_per_s=steps_per_s,
                           reused=0, steps=steps, key="k", round=1, sparsity=0.5)

    assert inference_budget(tracking, round_of(80, 1000.0)) == pytest.approx(0.008)  # a 0.08 s round
    assert inference_budget(tracking, round_of(20_000, 1000.0)) == 0.2  # a 20 s round: the whole budget
    assert inference_budget(tracking, round_of(80, 0.0)) == 0.2  # speed unknown (an old record)
