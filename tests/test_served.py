"""Tickets a user can use, after a real search: the served model, its fresh-venv load, the exports, MLflow's view.

One tiny search (4 lineages on the session's Ray, real MLflow on sqlite, real Optuna:
conftest.tracked_search) is shared by the tests here. The truth to compare with is what the search reported
(the best ticket's test accuracy, its mask) and the data set's own files.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.csv
import pytest
import safetensors.torch
import torch
from conftest import LTH_SEARCH
from mlflow import MlflowClient
from torch.nn.utils import prune

from lth_search.engine.data import load_dataset, read_raw
from lth_search.engine.models import build_model
from lth_search.tracking.client import read_artifact
from lth_search.tracking.ticket_reader import best_ticket

pytestmark = pytest.mark.slow
VENV_CACHE = Path(os.environ.get("LTH_TEST_VENV_CACHE", Path.home() / ".cache" / "lth_search" / "test-venvs"))


@pytest.fixture(scope="module")
def served(tracked_search):
    """The session's shared tracked search (conftest.py): 4 lineages, the best ticket registered as
    models:/tracked@best; with the ticket best_ticket finds and the data set's raw test split."""
    cfg, summary = tracked_search.cfg, tracked_search.summary
    assert summary["finished"] == 4
    ticket = best_ticket(experiment="tracked", tracking_uri=cfg.tracking_uri())
    (x_test, y_test) = read_raw(cfg.data)[0][2:]
    return {"cfg": cfg, "summary": summary, "ticket": ticket, "x_test": x_test, "y_test": y_test}


def test_registered_model_predicts_raw_inputs_with_the_reported_accuracy(served, monkeypatch):
    cfg, ticket = served["cfg"], served["ticket"]
    assert ticket.extra["model_uri"] == "models:/tracked@best"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking_uri())
    model = mlflow.pyfunc.load_model("models:/tracked@best")
    predicted = model.predict(served["x_test"])  # raw MNIST-1D inputs: the model normalises them
    accuracy = float((predicted == served["y_test"]).mean())
    assert abs(accuracy - ticket.test_accuracy) <= 0.001, (accuracy, ticket.test_accuracy)
    # what users pass: torch's float32, numpy's float64, a single 1-D row (no input schema refuses any)
    x32, x64 = served["x_test"].astype(np.float32), served["x_test"].astype(np.float64)
    assert np.array_equal(model.predict(x32), predicted) and np.array_equal(model.predict(x64), predicted)
    assert model.predict(x32[0]).tolist() == [predicted[0]]
    assert model.metadata.get_input_schema() is None and model.metadata.get_output_schema() is not None
    assert model.metadata.metadata["lth_input"]["input_shape"] == [-1, *ticket.input_shape]
    assert model.metadata.saved_input_example_info is not None  # (saved as JSON: it loads as float64)
    flavor = model.metadata.flavors["python_function"]
    assert flavor["loader_module"] == "lth_portable.ticket_model" and "python_model" not in flavor  # no cloudpickle
    # the trained half is what is served: pruned entries exactly zero, survivors trained away from theta_k
    pruned = 0
    for name, kept in ticket.mask.items():
        trained = ticket.trained_weights[name]
        assert torch.count_nonzero(trained[~kept]) == 0
        pruned += int((~kept).sum())
        assert not torch.equal(trained[kept], ticket.rewound_state()[name][kept])
    assert pruned > 0


def _bare_venv() -> Path:
    """A venv with torch and mlflow only (the versions running here), cached across sessions.

    Built from pip's cache/wheel sources once (about a minute); a lock keeps parallel
    sessions from building it twice, and `.ready` is written last.
    """
    versions = f"py{sys.version_info.major}{sys.version_info.minor}-torch-{torch.__version__.split('+')[0]}" \
               f"-mlflow-{mlflow.__version__}"
    root = VENV_CACHE / versions
    VENV_CACHE.mkdir(parents=True, exist_ok=True)
    with open(VENV_CACHE / f"{versions}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".ready").exists():
            shutil.rmtree(root, ignore_errors=True)
            base = getattr(sys, "_base_executable", sys.executable)
            subprocess.run([base, "-m", "venv", str(root)], check=True)
            subprocess.run([str(root / "bin" / "pip"), "install", "--quiet", f"torch=={torch.__version__.split('+')[0]}",
                            f"mlflow=={mlflow.__version__}"], check=True)
            (root / ".ready").write_text("torch and mlflow only\n")
    return root / "bin" / "python"


BARE_SCRIPT = """
import importlib.util, json, sys
import numpy as np
import mlflow
assert importlib.util.find_spec("lth_search") is None, "lth_search is importable here"
model = mlflow.pyfunc.load_model("models:/tracked@best")
np.save(sys.argv[2], model.predict(np.load(sys.argv[1], allow_pickle=False)))
print(sorted(m for m in sys.modules if m.startswith("lth")))
# the CSR export of `best --out DIR --format csr`, by its own loader (torch alone)
import torch
sys.path.insert(0, sys.argv[3])
import load_ticket
net, spec = load_ticket.load(), json.load(open(sys.argv[3] + "/model.json"))
norm = spec["normalization"]
x = (torch.tensor(np.load(sys.argv[1]), dtype=torch.float32) - torch.tensor(norm["mean"])) / torch.tensor(norm["std"])
with torch.no_grad():
    np.save(sys.argv[4], net(x).argmax(1).numpy())
print(sorted({type(m).__name__ for m in net.modules()}))
"""


def test_registered_model_loads_where_lth_search_is_not_installed(served, tmp_path, monkeypatch):
    python = _bare_venv()
    np.save(tmp_path / "x.npy", served["x_test"])
    done = subprocess.run([LTH_SEARCH, "best", "--tracking-uri", served["cfg"].tracking_uri(), "--experiment", "tracked",
                           "--out", str(tmp_path / "csr"), "--format", "csr"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(MLFLOW_TRACKING_URI=served["cfg"].tracking_uri(), PYTHONNOUSERSITE="1")
    done = subprocess.run([str(python), "-c", BARE_SCRIPT, str(tmp_path / "x.npy"), str(tmp_path / "y.npy"),
                           str(tmp_path / "csr"), str(tmp_path / "csr.npy")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-2] == "['lth_portable', 'lth_portable.architectures', 'lth_portable.sparse', " \
                        "'lth_portable.ticket_model']"  # the bundled code, nothing else
    assert "SparseLinear" in lines[-1]  # the CSR export runs sparse layers
    there = np.load(tmp_path / "y.npy", allow_pickle=False)
    assert np.array_equal(np.load(tmp_path / "csr.npy", allow_pickle=False), there)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served["cfg"].tracking_uri())
    here = mlflow.pyfunc.load_model("models:/tracked@best").predict(served["x_test"])
    assert np.array_equal(there, here)
    assert abs(float((there == served["y_test"]).mean()) - served["ticket"].test_accuracy) <= 0.001


def test_exported_mask_keeps_pruned_weights_zero_while_training(served, tmp_path):
    cfg = served["cfg"]
    done = subprocess.run([LTH_SEARCH, "best", "--tracking-uri", cfg.tracking_uri(), "--experiment", "tracked",
                           "--out", str(tmp_path / "ticket")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "ticket"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "mask.safetensors", "rewind.safetensors", "ticket.json", "trained.safetensors"]
    # the card carries the normalisation the served model applies: (x - mean) / std of raw inputs
    mean, std = load_dataset(cfg.data, cfg.seed).normalization
    card = json.loads((folder / "ticket.json").read_text())
    assert np.allclose(card["normalization"]["mean"], mean) and np.allclose(card["normalization"]["std"], std)
    masks = safetensors.torch.load_file(str(folder / "mask.safetensors"))
    ticket = served["ticket"]
    assert sorted(masks) == sorted(f"{name}_mask" for name in ticket.mask)

    # A PyTorch user's fine-tuning: a freshly built model, the ticket's rewind weights, torch's own pruning.
    model = build_model(cfg.model, ticket.input_shape, ticket.num_classes, seed=123)
    model.load_state_dict(safetensors.torch.load_file(str(folder / "rewind.safetensors")))
    for key, mask in masks.items():
        prune.custom_from_mask(model.get_submodule(key.removesuffix(".weight_mask")), "weight", mask)
    data = load_dataset(cfg.data, cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    start = {key: model.get_submodule(key.removesuffix(".weight_mask")).weight_orig.clone() for key in masks}
    for _ in range(30):
        batch = torch.randint(len(data.train), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(data.train.x[batch]), data.train.y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for key, mask in masks.items():
        module = model.get_submodule(key.removesuffix(".weight_mask"))
        assert (mask == 0).any() and torch.count_nonzero(module.weight[mask == 0]) == 0
        assert not torch.equal(module.weight_orig[mask == 1], start[key][mask == 1])  # it did train
        prune.remove(module, "weight")
        assert torch.count_nonzero(module.weight[mask == 0]) == 0


def test_mlflow_shows_data_set_model_series_and_provenance(served):
    cfg, summary, ticket = served["cfg"], served["summary"], served["ticket"]
    client = MlflowClient(cfg.tracking_uri())
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    fingerprint = load_dataset(cfg.data, cfg.seed).fingerprint
    registered = client.get_model_version_by_alias("tracked", "best")
    logged = [output.model_id for output in parent.outputs.model_outputs]  # the search run's Models column
    assert registered.source == f"models:/{logged[-1]}"
    # the model's source is the ticket's own lineage run, which lists it too
    assert registered.run_id == ticket.run_id
    assert client.get_logged_model(logged[-1]).source_run_id == ticket.run_id
    assert logged[-1] in [o.model_id for o in client.get_run(ticket.run_id).outputs.model_outputs]
    assert parent.data.tags["mlflow.note.content"].startswith("lth-search search `tracked`")
    assert sorted(int(c.data.tags["lth.optuna_trial"]) for c in children) == [0, 1, 2, 3]
    for child in children:
        tags = child.data.tags
        (data_input,) = child.inputs.dataset_inputs  # Dataset column
        assert (data_input.dataset.name, data_input.dataset.digest) == ("mnist1d", fingerprint[:32])
        assert tags["lth.search_id"] == summary["search_id"]
        assert tags["mlflow.source.git.commit"] and tags["mlflow.source.name"].startswith("lth-search")
        assert "IMP lineage" in tags["mlflow.note.content"]
        series = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "by_sparsity/val_accuracy")}
        rounds = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "sparsity")}
        vals = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "val_accuracy")}
        expected = {0: child.data.metrics["dense_val_accuracy"]}  # the dense point, at sparsity 0
        expected.update({round(1000 * rounds[r]): vals[r] for r in rounds})
        assert series == expected and len(series) == 4
    table = pyarrow.csv.read_csv(io.BytesIO(read_artifact(client, parent.info.run_id, "tickets.csv")))
    assert table.num_rows == 12 and ticket.run_id in table.column("run_id").to_pylist()
    # trial ids stay text (Ray's 8 hex digits are often all decimal: `01092534` must not become 1092534)
    trial_ids = {c.data.tags["lth.trial_id"] for c in children}
    assert {t.removeprefix("trial ") for t in table.column("trial_id").to_pylist()} == trial_ids
    assert all(t.startswith("trial ") for t in table.column("trial_id").to_pylist())
    # beside each Parquet mask, its per-layer sparsity as CSV (the UI previews CSV, not Parquet)
    layers = pyarrow.csv.read_csv(io.BytesIO(read_artifact(
        client, ticket.run_id, f"masks/round_{ticket.round:02d}_layers.csv"))).to_pylist()
    assert [row["layer"] for row in layers] == list(ticket.mask)
    for row in layers:
        kept = ticket.mask[row["layer"]]
        assert (row["weights"], row["kept"]) == (kept.numel(), int(kept.sum()))
    assert sum(r["weights"] - r["kept"] for r in layers) / sum(r["weights"] for r in layers) == \
        pytest.approx(ticket.sparsity, abs=1e-6)


def test_what_the_sparsity_buys_is_in_the_table_and_best_json(served):
    """Issue 23: per round, non-zeros, CSR export bytes, latency and peak memory against dense."""
    cfg, ticket = served["cfg"], served["ticket"]
    gains = ticket.summary()["inference"]  # what `best --json` prints
    dense = ticket.trained_model()
    assert gains["nonzero_params"] == sum(int(torch.count_nonzero(p)) for p in dense.parameters())
    assert 0 < gains["export_bytes"] < gains["dense_bytes"]
    assert all(gains[k] > 0 for k in ("latency_b1", "latency_batch", "peak_memory"))
    client = MlflowClient(cfg.tracking_uri())
    table = pyarrow.csv.read_csv(io.BytesIO(read_artifact(client, served["summary"]["parent_run_id"], "tickets.csv")))
    assert {"inference_latency_b1", "inference_export_bytes"} <= set(table.column_names)
    sparsities, sizes = table.column("sparsity").to_pylist(), table.column("inference_export_bytes").to_pylist()
    assert all(s is not None for s in sizes)
    # the sparser, the smaller: across the table's rounds the export shrinks with sparsity
    ordered = [size for _, size in sorted(zip(sparsities, sizes))]
    assert ordered[0] > ordered[-1]
