"""The bad-input tables of the fault drills, plain data: tests/test_faults.py and
tests/test_cli_errors.py run them under pytest, bench/drills.py runs them without it.

Each case is a command line (or `--set` overrides of a tiny lineage) and the text its
one `lth-search: error:` line must hold; nothing here imports pytest.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")

# (case, --set overrides of a tiny `lineage`, the text its one error line must hold). Defect numbers of issue 12.
INPUT_CASES = [
    ("9: steps 10**12", ["train.steps=1000000000000"], "train.steps"),
    ("9: epochs 10**11", ["train.steps=100000000000ep"], "train.steps"),
    ("9: width 1e9", ["model.widths=[1000000000]"], "model.widths"),
    ("9: too many hidden weights", ["model.widths=[16384, 16384, 16384]"], "hidden weights"),
    ("9: seed overflows", ["seed=100000000000000000000000000"], "seed"),
    ("9: lr inf", ["train.lr=.inf"], "train.lr"),
    ("9: lr nan", ["train.lr=.nan"], "train.lr"),
    ("9: output_ratio inf", ["prune.output_ratio=.inf"], "prune.output_ratio"),
    ("9: gamma inf", ["train.gamma=.inf"], "train.gamma"),
    ("9: layer ratio inf", ["prune.layer_ratios={fc: .inf}"], "prune.layer_ratios"),
    ("9: unknown layer group", ["prune.layer_ratios={attention: 0.5}"], "prune.layer_ratios"),
    ("9: init_scale inf", ["prune.init_scale=.inf"], "prune.init_scale"),
    ("9: momentum nan", ["train.momentum=.nan"], "train.momentum"),
    ("9: weight decay inf", ["train.weight_decay=.inf"], "train.weight_decay"),
    ("9: tolerance nan", ["search.tolerance=.nan"], "search.tolerance"),
    ("9: gpu inf", ["resources.gpu=.inf"], "resources.gpu"),
    ("9: cpu 10**6", ["resources.cpu=1000000"], "resources.cpu"),
    ("9: trials 10**10", ["search.num_trials=10000000000"], "search.num_trials"),
    ("9: rounds 10**6", ["prune.rounds=1000000"], "prune.rounds"),
    ("9: batch 10**9", ["train.batch_size=1000000000"], "train.batch_size"),
    ("9: milestone 10**12", ["train.milestones=[1000000000000]"], "train.milestones"),
    ("9: val_size 10**12", ["data.val_size=1000000000000"], "data.val_size"),
    ("9: search rate nan", ["search.space.rate=[.nan]"], "search.space.rate"),
    ("9: search ratio inf", ["search.space.layer_ratios={fc: [.inf]}"], "search.space.layer_ratios"),
    ("9: lease timeout inf", ["store.lease_timeout_s=.inf"], "store.lease_timeout_s"),
    ("9: heartbeat past timeout", ["store.heartbeat_s=200"], "store.heartbeat_s"),
    ("6: experiment ../", ["tracking.experiment=../evil"], "tracking.experiment"),
    ("6: experiment absolute", ["tracking.experiment=/tmp/evil"], "tracking.experiment"),
    ("6: layer group path", ["prune.layer_ratios={../x: 0.5}"], "layer group"),
    ("10: NUL in output_dir", ['output_dir="a\\0b"'], "output_dir"),
    ("10: NUL in data.root", ['data.root="a\\0b"'], "data.root"),
    ("10: newline in store.uri", ['store.uri="a\\nb"'], "store.uri"),
    ("10: http store", ["store.uri=http://127.0.0.1:1/store"], "store.uri"),
    ("1: unknown tracking scheme", ["tracking.uri=bogus://x", "tracking.enabled=true"], "tracking.uri"),
    ("13: name with a newline", ['name="quick\\n"'], "name"),
]

_BOMB = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    + ["model: {widths: *i}"]
)
# (case, config file text, the text the one error line must hold)
FILE_CASES = [
    ("11: YAML alias bomb", _BOMB, "model.widths"),
    ("11: deep nesting", "a: " + "[" * 3000 + "]" * 3000, "bad.yaml"),
    ("13: name with a trailing newline", 'name: "quick\\n"\n', "name"),
    ("10: not text", "\udcff\udcfe".encode("utf-8", "surrogateescape").decode("latin1"), "bad.yaml"),
]
# (case, command line with {out}, the text its one error line must hold, the exit code)
COMMAND_CASES = [
    ("7: resume ../../evil", ["resume", "../../evil", "--output-dir", "{out}"], "is invalid", 2),
    ("7: sync ../../evil", ["sync", "../../evil", "--output-dir", "{out}"], "is invalid", 2),
    ("7: resume a/b", ["resume", "a/b", "--output-dir", "{out}"], "is invalid", 2),
    ("7: resume, search.json a list", ["resume", "list", "--output-dir", "{out}"], "search.json", 2),
    ("7: resume, search.json without config", ["resume", "noconfig", "--output-dir", "{out}"], "search.json", 2),
    ("7: resume, config not a mapping", ["resume", "badconfig", "--output-dir", "{out}"], "search.json", 2),
    ("7: resume, truncated search.json", ["resume", "truncated", "--output-dir", "{out}"], "search.json", 2),
    ("7: sync, search.json a list", ["sync", "list", "--output-dir", "{out}"], "search.json", 2),
    ("7: sync, search.json without config", ["sync", "noconfig", "--output-dir", "{out}"], "search.json", 2),
    ("10: NUL in --output-dir", ["resume", "x", "--output-dir", "a\0b"], "--output-dir", 2),
    ("10: NUL in best --out", ["best", "--out", "a\0b"], "--out", 2),
    ("usage: unknown command", ["explode"], "", 2),
]
DAMAGED_STATES = {
    "list": "[1, 2]",
    "noconfig": json.dumps({"name": "noconfig", "search_id": "x", "results_path": "/r", "journal": "/j"}),
    "badconfig": json.dumps({"name": "badconfig", "search_id": "x", "config": [1], "results_path": "/r", "journal": "/j"}),
    "truncated": '{"name": "truncated", "sear',
}


def lineage_args(data_root: Path, out: Path, sets: list[str]) -> list[str]:
    base = [f"data.root={data_root}", f"output_dir={out}", "tracking.enabled=false", "model.widths=[32]",
            "train.steps=200", "prune.rounds=1", "prune.rewind_steps=[0]", "search.space.rewind_step=null"]
    return ["lineage", QUICKSTART] + [arg for s in base + sets for arg in ("--set", s)]


def write_damaged_states(out: Path) -> None:
    for name, text in DAMAGED_STATES.items():
        (out / "searches" / name).mkdir(parents=True, exist_ok=True)
        (out / "searches" / name / "search.json").write_text(text)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_workdir(tmp_path: Path) -> Path:
    """The folder the CLI_* cases run in: an empty data folder, a malformed CIFAR copy, a symlink loop."""
    (tmp_path / "empty").mkdir()
    cifar = tmp_path / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (cifar / name).write_bytes(b"this is not a pickle of a CIFAR batch")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return tmp_path


# (case id, extra --set overrides or a config file text, the text the one line must contain)
CLI_CASES = [
    ("unknown model", ["model.name=resnet99"], "model.name"),
    ("unknown data set", ["data.name=imagenet"], "data.name"),
    ("rate above 1", ["prune.rate=1.5"], "prune.rate"),
    ("rate zero", ["prune.rate=0"], "prune.rate"),
    ("negative rounds", ["prune.rounds=-1"], "prune.rounds"),
    ("rewind step not kept", ["prune.rewind_step=50"], "prune.rewind_step"),
    ("rewind step past the end", ["prune.rewind_steps=[0, 100, 5000]"], "prune.rewind_steps"),
    ("unknown key in --set", ["prune.colour=red"], "prune.colour"),
    ("wrong type in --set", ["train.batch_size=many"], "train.batch_size"),
    ("--set without a value", ["prune.rate"], "--set"),
    ("bad init scale", ["prune.init_scale=huge"], "prune.init_scale"),
    ("cuda without cuda", ["train.device=cuda"], "train.device"),
    ("conv model on 1-D data", ["model.name=conv6"], "model.name"),
    ("missing MNIST files", ["data.name=mnist", "data.root={empty}"], "train-images-idx3-ubyte"),
    ("malformed CIFAR batch", ["data.name=cifar10", "data.root={cifar}"], "data_batch_1"),
    ("search value not kept", ["search.space.rewind_step=[0, 30]"], "search.space.rewind_step"),
    ("a space value listed twice", ["search.space.rate=[0.2, 0.2]"], "listed more than once"),
    ("output_dir a symlink loop", ["output_dir={loop}/out"], "output_dir"),
]
CLI_FILE_CASES = [
    ("YAML syntax error", "prune:\n  rate: [0.2\n", "bad.yaml"),
    ("unknown top-level key", "trian:\n  lr: 0.1\n", "trian"),
    ("not a mapping", "- 1\n- 2\n", "bad.yaml"),
    ("a config over 1 MiB", "#" * (2 << 20), "at most"),
]


# Commands other than `lineage`: (case id, arguments, the text the one line must contain, exit code:
# 2 for usage and config errors, 1 for a valid command the world could not answer)
CLI_COMMAND_CASES = [
    ("run: rate above 1", ["run", QUICKSTART, "--set", "prune.rate=2"], "prune.rate", 2),
    ("run: a GPU this machine lacks", ["run", QUICKSTART, "--set", "resources.gpu=1"], "resources.gpu", 2),
    ("run: nobody at --address", ["run", QUICKSTART, "--address", "127.0.0.1:{port}"], "--address", 2),
    ("run: nobody at RAY_ADDRESS", ["run", QUICKSTART, "env:RAY_ADDRESS=127.0.0.1:{port}"], "RAY_ADDRESS", 2),
    ("run: missing config", ["run", "nowhere.yaml"], "nowhere.yaml", 2),
    ("run: prune.rate not in the space", ["run", QUICKSTART, "--set", "prune.rate=0.999"], "search.space.rate", 2),
    ("lineage: /dev/zero as the config", ["lineage", "/dev/zero"], "not a regular file", 2),
    ("lineage: a folder as the config", ["lineage", "."], "not a regular file", 2),
    ("resume: unknown search", ["resume", "nosuch"], "nosuch", 2),
    ("sync: unknown search", ["sync", "nosuch"], "nosuch", 2),
    ("best: no database", ["best"], "mlflow.db", 1),
    ("best: drop outside [0, 1]", ["best", "--max-drop", "-1"], "max_accuracy_drop", 2),
    ("tickets: no database", ["tickets", "--tracking-uri", "sqlite:////nonexistent/x.db"], "/nonexistent/x.db", 1),
    ("tickets: MLFLOW_TRACKING_URI", ["tickets", "env:MLFLOW_TRACKING_URI=sqlite:////nonexistent/y.db"], "/nonexistent/y.db", 1),
]
