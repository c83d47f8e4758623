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

from conftest import LTH_SEARCH
from fault_cases import CLI_CASES as CASES
from fault_cases import CLI_COMMAND_CASES as COMMAND_CASES
from fault_cases import CLI_FILE_CASES as FILE_CASES
from fault_cases import QUICKSTART, closed_port as _closed_port, cli_workdir
from fault_helpers import run_cli


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
    return cli_workdir(tmp_path)


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
