"""Run a tiny search on a real two-node Ray cluster on loopback; print what happened as JSON.

Run by tests/test_search_distributed.py in its own process, because a process holds
one Ray connection and the test session already has its local Ray.

    python tests/two_node_search.py DATA_ROOT OUTPUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# ray.init(address="127.0.0.1:PORT") rewrites a loopback address to the machine's routable
# IP, where a loopback-bound GCS does not listen; with this, Ray's node IP is loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_helpers import manifests, search_config, trial_records, trial_results  # noqa: E402

from lth_search.api import run_search  # noqa: E402


def main(data_root: Path, output_dir: Path) -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray.init(address=cluster.address)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        cfg = search_config(data_root, output_dir, {
            "search.num_trials": 4,
            "search.space.rate": "[0.2, 0.4]",
            "search.asha.enabled": "false",
            "train.steps": 400,  # long enough that both nodes are busy at once
        })
        summary = run_search(cfg, progress=lambda _: None)
        histories = trial_results(summary["results_path"])
        records = trial_records(output_dir / "store", cfg.name)
        dense = [m["key"] for m in manifests(output_dir / "store") if m["kind"] == "dense"]
        print(json.dumps({
            "cluster_nodes": nodes,
            "trial_nodes": {t: sorted({r["node_id"] for r in rows}) for t, rows in histories.items()},
            "rounds": {t: [r["round"] for r in rows] for t, rows in histories.items()},
            "dense_stages": dense,
            "dense_trainers": [t for t, r in records.items() if dense and dense[0] in r["attempts"][0]["executed_keys"]],
            "finished": summary["finished"],
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
