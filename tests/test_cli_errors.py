"""Bad input: one line naming the key or file, a non-zero exit, no traceback, nothing written.

Most cases run `lth-search` in this process through `cli.main` (fault_helpers.run_cli: its
stdout, stderr and the warnings the console script would print); the console script itself
runs in a subprocess where the process matters: a CUDA device hidden by CUDA_VISIBLE_DEVICES,
and `run` finding a Ray cluster or a GPU (this process may hold the session's Ray).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import LTH_SEARCH, REPO
from fault_helpers import run_cli

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")

# (case id, extra --set overrides or a config file text, the text the one line must contain)
CASES = [
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
FILE_CASES = [
    ("YAML syntax error", "prune:\n  rate: [0.2\n", "bad.yaml"),
    ("unknown top-level key", "trian:\n  lr: 0.1\n", "trian"),
    ("not a mapping", "- 1\n- 2\n", "bad.yaml"),
    ("a config over 1 MiB", "#" * (2 << 20), "at most"),
]


def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _run(args: list[str], cwd: Path, extra_env: dict[str, str] | None = None,
         in_process: pytest.MonkeyPatch | None = None) -> subprocess.CompletedProcess:
    """`lth-search ARGS` in `cwd`: the console script in a subprocess, or `cli.main` in this
    process when given a MonkeyPatch (which sets the directory and `extra_env` for the call)."""
    if in_process is not None:
        in_process.chdir(cwd)
        for key, value in (extra_env or {}).items():
            in_process.setenv(key, value)
        code, out, err = run_cli(args)
        return subprocess.CompletedProcess(["lth-search", *args], code, out, err)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(extra_env or {})}
    return subprocess.run([LTH_SEARCH, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


SUBPROCESS = {"cuda without cuda", "run: a GPU this machine lacks", "run: nobody at --address",
              "run: nobody at RAY_ADDRESS"}
"""Cases run through the console script in a subprocess (see the module docstring)."""


def _assert_one_line_error(done: subprocess.CompletedProcess, needle: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert needle in lines[0] and lines[0].startswith("lth-search: error:"), lines[0]
    assert done.stdout == ""


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    cifar = tmp_path / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (cifar / name).write_bytes(b"this is not a pickle of a CIFAR batch")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return tmp_path


@pytest.mark.parametrize(("case", "overrides", "needle"), CASES, ids=[c[0] for c in CASES])
def test_bad_lineage_input(case: str, overrides: list[str], needle: str, workdir: Path, data_root: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    sets = [f"data.root={data_root}", f"output_dir={workdir / 'runs'}", "prune.rewind_steps=[0, 100]",
            "search.space.rewind_step=null"]
    sets += [o.format(empty=workdir / "empty", cifar=workdir / "cifar", loop=workdir / "loop") for o in overrides]
    before_work, before_data = _snapshot(workdir), _snapshot(data_root)
    done = _run(["lineage", QUICKSTART] + [arg for s in sets for arg in ("--set", s)], workdir,
                in_process=None if case in SUBPROCESS else monkeypatch)
    _assert_one_line_error(done, needle)
    assert _snapshot(workdir) == before_work and _snapshot(data_root) == before_data  # nothing written


@pytest.mark.parametrize(("case", "text", "needle"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_config_file(case: str, text: str, needle: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (workdir / "bad.yaml").write_text(text)
    before = _snapshot(workdir)
    done = _run(["lineage", "bad.yaml"], workdir, in_process=monkeypatch)
    _assert_one_line_error(done, needle)
    assert _snapshot(workdir) == before


def test_missing_config_file(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    done = _run(["lineage", "nowhere.yaml"], workdir, in_process=monkeypatch)
    _assert_one_line_error(done, "nowhere.yaml")
    assert not (workdir / "lth_runs").exists()


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the test uses it: nothing answers there


# Commands other than `lineage`: (case id, arguments, the text the one line must contain, exit code:
# 2 for usage and config errors, 1 for a valid command the world could not answer)
COMMAND_CASES = [
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


@pytest.mark.parametrize(("case", "args", "needle", "code"), COMMAND_CASES, ids=[c[0] for c in COMMAND_CASES])
def test_bad_command_input(case: str, args: list[str], needle: str, code: int, workdir: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    before = _snapshot(workdir)
    port = _closed_port()
    env = dict(a[len("env:"):].format(port=port).split("=", 1) for a in args if a.startswith("env:"))
    done = _run([a.format(port=port) for a in args if not a.startswith("env:")], workdir, env,
                in_process=None if case in SUBPROCESS else monkeypatch)
    _assert_one_line_error(done, needle)
    assert done.returncode == code, done.stderr
    assert _snapshot(workdir) == before


def test_version_and_usage_errors() -> None:
    done = subprocess.run([LTH_SEARCH, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("lth-search ")
    done = subprocess.run([LTH_SEARCH, "run"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "config" in done.stderr


def test_every_option_says_what_it_takes() -> None:
    import argparse

    from lth_search.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, f"lth-search {name} {'/'.join(action.option_strings) or action.dest} has no help"
    best = commands.choices["best"]
    assert "fraction" in next(a for a in best._actions if "--max-drop" in a.option_strings).help


def test_a_lineage_does_not_check_its_prune_values_against_the_search_space() -> None:
    """`lineage --set prune.rate=0.999` searches nothing, so the space's rates do not matter (issue 22 item 10)."""
    from lth_search.config import load_config
    from lth_search.errors import ConfigError

    cfg = load_config(QUICKSTART, ["prune.rate=0.999"])
    assert cfg.prune.rate == 0.999
    with pytest.raises(ConfigError, match=r"^search\.space\.rate: .* must include the default recipe's 0.999"):
        cfg.check_search_space()


def test_unknown_tracking_names_and_a_malformed_database_are_user_errors(workdir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown --experiment or --search-run-id, a file that is not an MLflow database: exit 2, one line
    (issue 22 item 8)."""
    from mlflow import MlflowClient

    (workdir / "garbage.db").write_bytes(b"this is not a database at all" * 100)
    done = _run(["tickets", "--tracking-uri", f"sqlite:///{workdir / 'garbage.db'}"], workdir, in_process=monkeypatch)
    _assert_one_line_error(done, "cannot be read")
    assert done.returncode == 2
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # an empty MLflow database
    for args, needle in ((["best", "--experiment", "nope"], "--experiment"),
                         (["tickets", "--search-run-id", "0123456789abcdef0123456789abcdef"], "--search-run-id")):
        done = _run([*args, "--tracking-uri", uri], workdir, in_process=monkeypatch)
        _assert_one_line_error(done, needle)
        assert done.returncode == 2
