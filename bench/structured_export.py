"""A channel-pruned Conv-6 ticket exported as a smaller dense network: its latency and accuracy (issue 23, 3).

Runs one real lineage (`lth-search lineage`, MLflow on sqlite in a temporary folder) of Conv-6
with `prune.structure: channel`, layerwise 30 % of the units per round for 2 rounds (about
half of every layer's channels gone), on the digits data set (8x8, offline; CIFAR-10 on a GPU
machine: `--data cifar10`). Then, as a user would: `best_ticket` picks the last round, the
ticket is exported with `--format structured` (ticket_forms.export_ticket), loaded by its own
torch-only loader, and

- its test accuracy is computed from the data set's test split and set beside the accuracy the
  tickets table reports for that round;
- its forward time at batch 64 (one CPU thread) is measured against the ticket's dense trained
  network in the same process, the two taking turns (portable/sparse.py `seconds_per_call`).

    .venv/bin/python bench/structured_export.py                # ~2-5 min on 2 cores
    .venv/bin/python bench/structured_export.py --steps 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

LTH = str(Path(sys.executable).with_name("lth-search"))
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "conv6_cifar10.yaml")


def run_lineage(args: argparse.Namespace, out: Path) -> None:
    sets = {"name": "conv6-channel", "data.name": args.data, "train.steps": args.steps, "prune.rounds": args.rounds,
            "prune.rate": args.rate, "train.batch_size": args.batch_size, "prune.structure": "channel", "prune.scope": "layerwise",
            "prune.layer_ratios": "{}", "prune.output_ratio": 1.0, "prune.rewind_steps": "[0]",
            "search.space.rewind_step": "null", "search.space.init_scale": "null", "prune.dense_replicates": 1,
            "prune.patience": 99, "output_dir": str(out), "tracking.measure_inference": "false"}
    if args.data == "digits":
        sets["data.val_size"] = 300
    command = [LTH, "lineage", CONFIG, *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")]]
    subprocess.run(command, check=True, env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out}/mlflow.db"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=16, help="training batch (Conv-6 trains slowly on CPU)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", type=float, default=0.3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of latency timing")
    parser.add_argument("--out", help="keep the lineage's outputs here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lth-structured-") as tmp:
        out = Path(args.out or tmp).resolve()
        if not (out / "mlflow.db").exists():  # --out of an earlier run: measure its ticket again
            run_lineage(args, out)
        measure(args, out)


def measure(args: argparse.Namespace, out: Path) -> None:
    from lth_search.api import best_ticket, list_tickets
    from lth_search.engine.data import load_dataset
    from lth_search.portable.export import load_export
    from lth_search.portable.sparse import seconds_per_call
    from lth_search.ticket_forms import export_ticket

    uri = f"sqlite:///{out}/mlflow.db"
    rows = list_tickets(experiment="conv6-channel", tracking_uri=uri)
    last = max(rows, key=lambda r: r["round"])
    ticket = best_ticket(experiment="conv6-channel", min_sparsity=last["sparsity"] - 1e-9, tracking_uri=uri)
    folder = export_ticket(ticket, out / "structured", "structured")
    small = load_export(folder)
    spec = json.loads((folder / "model.json").read_text())
    dense = ticket.trained_model()
    data = load_dataset(ticket.config.data, ticket.config.seed)
    with torch.no_grad():
        predicted = torch.cat([small(data.test.x[i:i + 256]).argmax(1) for i in range(0, len(data.test.x), 256)])
        dense_predicted = torch.cat([dense(data.test.x[i:i + 256]).argmax(1) for i in range(0, len(data.test.x), 256)])
    accuracy = float((predicted == data.test.y).float().mean())
    torch.set_num_threads(1)
    x = data.test.x[:args.batch]
    with torch.no_grad():
        spent = seconds_per_call({"dense": lambda: dense(x), "structured": lambda: small(x)}, args.budget)
    before = spec["structured_from"]["widths"]
    after = [w for w in spec["options"]["plan"] if w != "M"] + spec["options"]["fc"]
    ratio = spent["structured"] / spent["dense"]
    print(f"ticket: round {ticket.round}, sparsity {100 * ticket.sparsity:.2f}% (channel pruning, layerwise "
          f"{args.rate} per round); units per layer {before} -> {after} "
          f"({100 * sum(after) / sum(before):.1f}% kept)")
    print(f"test accuracy: structured export {100 * accuracy:.2f}%, tickets table {100 * ticket.test_accuracy:.2f}%, "
          f"predictions equal to the dense ticket's: {bool(torch.equal(predicted, dense_predicted))}")
    print(f"acceptance 3: batch {args.batch}, 1 thread: structured {1e3 * spent['structured']:.3f} ms vs dense "
          f"{1e3 * spent['dense']:.3f} ms = {ratio:.3f}x -> {'held' if ratio <= 0.6 else 'NOT held'} (needs <= 0.6x)")


if __name__ == "__main__":
    main()
