"""Fault drills (issues 12 and 22): every bad input and machine fault we know; prints tried / held.

A case *holds* when lth-search answers as promised: one `lth-search: error:` line naming
the key, file or name (exit 2 for input, 1 for a runtime failure, 130 for an interrupt),
no traceback, nothing half-written, no hang, no lost result; a fault the product recovers
from is recovered from (a tampered stage recomputed, never loaded); a config never runs
code its user did not mark as a plug-in; a copied search resumes as itself.

It stands on the product's public interfaces only: the `lth-search` command line (run
in this process through `lth_search.cli.main`, the console script's entry point, or as
the console script itself where the process matters), files on disk, and a user's own
plug-in module written here. It needs neither pytest nor the test suite: the bad-input
tables are plain data in tests/fault_cases.py, shared with the tests.

    python bench/drills.py [--search] [--only SUBSTRING]

`--search` adds the drills that start Ray (a second driver, SIGTERM, a copied folder).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # fault_cases.py: plain data

import fault_cases as cases  # noqa: E402
from fault_helpers import one_line_error as one_line  # noqa: E402
from fault_helpers import run_cli as run  # noqa: E402

LTH_SEARCH = str(Path(sys.executable).with_name("lth-search"))
Drill = Callable[[Path, Path], "str | None"]
"""(data root, a fresh folder) -> None if the case held, else what went wrong."""


# Folders ------------------------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}


def tiny(data: Path, out: Path, sets: list[str] = ()) -> list[str]:
    return cases.lineage_args(data, out, list(sets))


# The shared tables ------------------------------------------------------------------------------
def table_drills() -> dict[str, Drill]:
    """tests/fault_cases.py's tables: each case one line, the right exit code, nothing written."""
    found: dict[str, Drill] = {}
    for case, sets, needle in cases.INPUT_CASES:
        def input_case(data: Path, tmp: Path, sets=sets, needle=needle) -> str | None:
            before = snapshot(tmp)
            code, out, err = run(tiny(data, tmp / "out", sets))
            return one_line(code, err, 2, needle) or (None if out == "" and snapshot(tmp) == before else "wrote")
        found[f"input {case}"] = input_case
    for case, text, needle in cases.FILE_CASES:
        def file_case(data: Path, tmp: Path, case=case, text=text, needle=needle) -> str | None:
            (tmp / "bad.yaml").write_bytes(text.encode("latin1") if case.endswith("not text") else text.encode())
            code, _, err = run(["lineage", str(tmp / "bad.yaml"), "--set", f"output_dir={tmp / 'out'}"])
            return one_line(code, err, 2, needle) or (None if not (tmp / "out").exists() else "wrote")
        found[f"file {case}"] = file_case
    for case, args, needle, exit_code in cases.COMMAND_CASES:
        def command_case(data: Path, tmp: Path, args=args, needle=needle, exit_code=exit_code, case=case) -> str | None:
            cases.write_damaged_states(tmp / "out")
            code, _, err = run([a.format(out=tmp / "out") for a in args])
            if case.startswith("usage"):
                return None if code == 2 and "Traceback" not in err else f"exit {code}: {err[-200:]}"
            return one_line(code, err, exit_code, needle)
        found[f"command {case}"] = command_case
    for case, overrides, needle in cases.CLI_CASES:
        def cli_case(data: Path, tmp: Path, overrides=overrides, needle=needle) -> str | None:
            work = cases.cli_workdir(tmp)
            sets = [f"data.root={data}", f"output_dir={work / 'runs'}", "prune.rewind_steps=[0, 100]",
                    "search.space.rewind_step=null"]
            sets += [o.format(empty=work / "empty", cifar=work / "cifar", loop=work / "loop") for o in overrides]
            before = snapshot(work)
            code, _, err = run(["lineage", cases.QUICKSTART, *(a for s in sets for a in ("--set", s))], cwd=work,
                               env={"CUDA_VISIBLE_DEVICES": ""})
            return one_line(code, err, 2, needle) or (None if snapshot(work) == before else "wrote")
        found[f"lineage {case}"] = cli_case
    for case, text, needle in cases.CLI_FILE_CASES:
        def cli_file_case(data: Path, tmp: Path, text=text, needle=needle) -> str | None:
            (tmp / "bad.yaml").write_text(text)
            before = snapshot(tmp)
            code, _, err = run(["lineage", "bad.yaml"], cwd=tmp)
            return one_line(code, err, 2, needle) or (None if snapshot(tmp) == before else "wrote")
        found[f"config file {case}"] = cli_file_case
    for case, args, needle, exit_code in cases.CLI_COMMAND_CASES:
        def cli_command_case(data: Path, tmp: Path, args=args, needle=needle, exit_code=exit_code) -> str | None:
            work = cases.cli_workdir(tmp)
            port = cases.closed_port()
            env = dict(a[len("env:"):].format(port=port).split("=", 1) for a in args if a.startswith("env:"))
            before = snapshot(work)
            code, _, err = run([a.format(port=port) for a in args if not a.startswith("env:")], cwd=work,
                               env={"CUDA_VISIBLE_DEVICES": "", **env})
            return one_line(code, err, exit_code, needle) or (None if snapshot(work) == before else "wrote")
        found[f"command {case}"] = cli_command_case
    return found


# Issue 22: plug-ins, configs, tracking names ---------------------------------------------------
PARTS = '''
    """A user's own module: marked factories, and functions a config must not call."""
    from pathlib import Path

    import numpy as np
    from torch import nn

    from lth_search import plugin


    @plugin
    def mlp(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 16), nn.ReLU(),
                             nn.Linear(16, num_classes))


    @plugin
    def too_wide(input_shape, num_classes):
        return mlp(input_shape, num_classes + 3)


    @plugin
    def broken(input_shape, num_classes):
        raise RuntimeError("broken on purpose")


    @plugin
    def waves(root):
        rng = np.random.default_rng(0)
        y, y_test = rng.integers(0, 3, 300), rng.integers(0, 3, 100)
        return rng.normal(size=(300, 8)) + y[:, None], y, rng.normal(size=(100, 8)) + y_test[:, None], y_test


    @plugin
    def stray_label(root):
        x, y, x_test, y_test = waves(root)
        y[0] = 99
        return x, y, x_test, y_test


    def unmarked_delete(root):
        Path(root).unlink()
'''


@contextlib.contextmanager
def user_module(tmp: Path) -> Iterator[str]:
    """`drill_parts_<n>`: the module above, importable for the block; yields its name."""
    name = f"drill_parts_{tmp.name}"
    (tmp / f"{name}.py").write_text(textwrap.dedent(PARTS))
    sys.path.insert(0, str(tmp))
    try:
        yield name
    finally:
        sys.path.remove(str(tmp))
        sys.modules.pop(name, None)


def plugin_refused(field: str, target: str, needle: str) -> Drill:
    def drill(data: Path, tmp: Path) -> str | None:
        victim = tmp / "victim"
        victim.mkdir()
        (victim / "keep.txt").write_text("keep")
        root = victim if "rmtree" in target else victim / "keep.txt"
        with user_module(tmp) as module:
            code, _, err = run(tiny(data, tmp / "out", [f"{field}={target.format(module=module)}", f"data.root={root}"]))
        if not (victim / "keep.txt").exists():
            return "the file was deleted: the target ran"
        return one_line(code, err, 2, needle) or (None if not (tmp / "out").exists() else "wrote")
    return drill


def plugin_misfit(sets: list[str], needle: str) -> Drill:
    def drill(data: Path, tmp: Path) -> str | None:
        with user_module(tmp) as module:
            code, _, err = run(tiny(data, tmp / "out", [s.format(module=module) for s in sets] + ["data.val_size=50"]))
        return one_line(code, err, 2, needle)
    return drill


def plugins_that_fit_run(data: Path, tmp: Path) -> str | None:
    with user_module(tmp) as module:
        code, out, err = run(tiny(data, tmp / "out", [f"model.name={module}:mlp", f"data.name={module}:waves",
                                                      "data.val_size=50"]) + ["--json"])
    return None if code == 0 and '"rounds"' in out else f"exit {code}: {err[-300:]}"


def config_path_case(make: Callable[[Path], Path], needle: str) -> Drill:
    def drill(data: Path, tmp: Path) -> str | None:
        path = make(tmp)
        began = time.time()
        code, _, err = run(["lineage", str(path), "--set", f"output_dir={tmp / 'out'}"])
        slow = time.time() - began > 30
        return "took over 30 s" if slow else one_line(code, err, 2, needle)
    return drill


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "fifo.yaml")
    return tmp / "fifo.yaml"


def _big(tmp: Path) -> Path:
    (tmp / "big.yaml").write_text("#" * (2 << 20))
    return tmp / "big.yaml"


def lineage_ignores_the_search_space(data: Path, tmp: Path) -> str | None:
    code, out, err = run(tiny(data, tmp / "out", ["prune.rate=0.999", "search.space.rate=[0.2, 0.4]"]) + ["--json"])
    return None if code == 0 and '"rounds"' in out else f"exit {code}: {err[-300:]}"


def run_checks_the_search_space(data: Path, tmp: Path) -> str | None:
    code, _, err = run(["run", cases.QUICKSTART, "--set", "prune.rate=0.999", "--set", f"output_dir={tmp / 'out'}"])
    return one_line(code, err, 2, "search.space.rate") or (None if not (tmp / "out").exists() else "wrote")


def _empty_mlflow(tmp: Path) -> str:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def unknown_experiment(data: Path, tmp: Path) -> str | None:
    code, _, err = run(["best", "--experiment", "nope", "--tracking-uri", _empty_mlflow(tmp)])
    return one_line(code, err, 2, "--experiment")


def unknown_search_run_id(data: Path, tmp: Path) -> str | None:
    code, _, err = run(["tickets", "--search-run-id", "0" * 32, "--tracking-uri", _empty_mlflow(tmp)])
    return one_line(code, err, 2, "--search-run-id")


def malformed_mlflow_db(data: Path, tmp: Path) -> str | None:
    (tmp / "mlflow.db").write_bytes(b"not a database" * 200)
    code, _, err = run(["tickets", "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"])
    return one_line(code, err, 2, "cannot be read")


def state_path_leaving_its_folder(data: Path, tmp: Path) -> str | None:
    folder = tmp / "out" / "searches" / "escape"
    folder.mkdir(parents=True)
    (folder / "search.json").write_text(json.dumps({
        "name": "escape", "search_id": "escape-1", "config": {"name": "escape"}, "results_path": "../../../etc",
        "journal": "searches/escape/optuna.journal", "relative": ["results_path"],
    }))
    code, _, err = run(["resume", "escape", "--output-dir", str(tmp / "out")])
    return one_line(code, err, 2, "search.json")


# Stages tampered with on disk, seen through the command line ------------------------------------
def tampered_stage(tamper: Callable[[Path], None]) -> Drill:
    """A stored lineage whose dense stage is tampered with: the rerun recomputes it, never loads it."""
    def drill(data: Path, tmp: Path) -> str | None:
        args = tiny(data, tmp / "out", ["train.steps=100"]) + ["--json"]
        code, out, err = run(args)
        if code != 0:
            return f"first run: exit {code}: {err[-300:]}"
        manifests = sorted((tmp / "out" / "store" / "stages").glob("*/*/manifest.json"), key=lambda p: p.stat().st_mtime)
        tamper(manifests[0].parent)
        code, out, err = run(args)
        if code != 0 or "Traceback" in err:
            return f"rerun: exit {code}: {err[-300:]}"
        executed = json.loads(out)["steps_executed"]
        return None if executed > 0 else "the tampered stage was reused"
    return drill


def _flip_weight_byte(stage: Path) -> None:
    weights = next(p for p in stage.iterdir() if p.name.startswith("weights"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01
    weights.write_bytes(bytes(blob))


def _truncate_manifest(stage: Path) -> None:
    manifest = stage / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])


class _Payload:
    def __reduce__(self):  # what an attacker's file runs on unpickling
        return (os.system, ("touch /tmp/lth-drill-pwned",))


def _pickle_as_weights(stage: Path) -> None:
    weights = next(p for p in stage.iterdir() if p.name.startswith("weights"))
    weights.write_bytes(pickle.dumps(_Payload()))


def _pickle_as_manifest(stage: Path) -> None:
    (stage / "manifest.json").write_bytes(pickle.dumps(_Payload()))


def _delete_weights(stage: Path) -> None:
    for weights in stage.glob("weights*"):
        weights.unlink()


def not_pwned(drill: Drill) -> Drill:
    def checked(data: Path, tmp: Path) -> str | None:
        Path("/tmp/lth-drill-pwned").unlink(missing_ok=True)
        problem = drill(data, tmp)
        return "a pickle payload ran" if Path("/tmp/lth-drill-pwned").exists() else problem
    return checked


def malicious_cifar_batch(data: Path, tmp: Path) -> str | None:
    folder = tmp / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": _Payload(), b"labels": []}, protocol=2))
    code, _, err = run(tiny(data, tmp / "out", ["data.name=cifar10", f"data.root={tmp / 'cifar'}", "model.name=conv2"]))
    return one_line(code, err, 2, "data_batch_1")


def mlflow_server_that_does_not_answer(data: Path, tmp: Path) -> str | None:
    port = cases.closed_port()
    code, out, err = run(tiny(data, tmp / "out", ["tracking.enabled=true", f"tracking.uri=http://127.0.0.1:{port}"])
                         + ["--json"])
    return None if code == 0 and '"rounds"' in out and "Traceback" not in err else f"exit {code}: {err[-300:]}"


def sigterm_during_a_lineage(data: Path, tmp: Path) -> str | None:
    """The console script: SIGTERM is Ctrl-C (exit 130, "interrupted"), never a stack dump."""
    args = [LTH_SEARCH, *tiny(data, tmp / "out", ["train.steps=200000"])]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp / "out" / "store").glob("leases/*.lease")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return None if proc.returncode == 130 and "interrupted" in err and "Traceback" not in err else \
        f"exit {proc.returncode}: {err[-300:]}"


ISSUE_22: dict[str, Drill] = {
    "plug-in data.name=os:remove": plugin_refused("data.name", "os:remove", "standard library"),
    "plug-in data.name=shutil:rmtree": plugin_refused("data.name", "shutil:rmtree", "standard library"),
    "plug-in model.name=os:system": plugin_refused("model.name", "os:system", "standard library"),
    "plug-in unmarked function": plugin_refused("data.name", "{module}:unmarked_delete", "not marked"),
    "plug-in model factory that raises": plugin_misfit(["model.name={module}:broken", "data.name={module}:waves"],
                                                       "RuntimeError"),
    "plug-in model with 3 logits too many": plugin_misfit(["model.name={module}:too_wide", "data.name={module}:waves"],
                                                          "(2, 6)"),
    "plug-in data with a stray label 99": plugin_misfit(["model.name={module}:mlp", "data.name={module}:stray_label"],
                                                        "never occur"),
    "marked plug-ins that fit run": plugins_that_fit_run,
    "config /dev/zero": config_path_case(lambda tmp: Path("/dev/zero"), "not a regular file"),
    "config a FIFO": config_path_case(_fifo, "not a regular file"),
    "config a folder": config_path_case(lambda tmp: tmp, "not a regular file"),
    "config of 2 MiB": config_path_case(_big, "at most"),
    "duplicate search-space values": lambda data, tmp: one_line(
        *run(tiny(data, tmp / "out", ["search.space.rate=[0.2, 0.2]"]))[::2], 2, "listed more than once"),
    "lineage ignores the search space": lineage_ignores_the_search_space,
    "run checks the search space": run_checks_the_search_space,
    "unknown --experiment": unknown_experiment,
    "unknown --search-run-id": unknown_search_run_id,
    "malformed mlflow.db": malformed_mlflow_db,
    "search.json path leaving its folder": state_path_leaving_its_folder,
    "stage: flipped byte in weights": tampered_stage(_flip_weight_byte),
    "stage: truncated manifest": tampered_stage(_truncate_manifest),
    "stage: pickle in place of weights": not_pwned(tampered_stage(_pickle_as_weights)),
    "stage: pickle in place of manifest": not_pwned(tampered_stage(_pickle_as_manifest)),
    "stage: weights deleted": tampered_stage(_delete_weights),
    "malicious pickle as CIFAR batches": not_pwned(malicious_cifar_batch),
    "MLflow server that does not answer": mlflow_server_that_does_not_answer,
    "SIGTERM during a lineage": sigterm_during_a_lineage,
}


# With Ray (--search) ---------------------------------------------------------------------------
def _search_command(data: Path, out: Path, name: str, steps: int) -> list[str]:
    (out.parent / f"{name}.yaml").write_text(f"name: {name}\n")
    sets = [f"data.root={data}", f"output_dir={out}", "tracking.enabled=false", "model.widths=[32]",
            f"train.steps={steps}", "prune.rounds=2", "prune.rewind_steps=[0]", "prune.patience=99",
            "prune.dense_replicates=1", "search.num_trials=2", "search.space.rate=[0.2, 0.5]",
            "search.space.rewind_step=null", "search.asha.enabled=false", "search.confirm_seeds=0"]
    return [LTH_SEARCH, "run", str(out.parent / f"{name}.yaml"), *(a for s in sets for a in ("--set", s))]


def _started(out: Path, proc: subprocess.Popen, timeout: float = 300) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if list((out / "store" / "records").glob("*/*.json")):
            return True
        time.sleep(0.2)
    return False


def second_driver_and_sigterm(data: Path, tmp: Path) -> str | None:
    """A second `run` and a `resume` of a running search are refused naming the driver; SIGTERM stops it (130)."""
    out = tmp / "out"
    command = _search_command(data, out, "busy", 40000)
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        if not _started(out, driver):
            return f"the search did not start: {driver.communicate()[1][-300:]}"
        for args in (command, [LTH_SEARCH, "resume", "busy", "--output-dir", str(out)]):
            done = subprocess.run(args, capture_output=True, text=True, timeout=300)
            problem = one_line(done.returncode, done.stderr, 1, f"driven by pid {driver.pid}")
            if problem:
                return f"{args[1]}: {problem}"
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    state = json.loads((out / "searches" / "busy" / "search.json").read_text())
    if driver.returncode != 130 or "Aborted" in err or state["status"] != "interrupted":
        return f"exit {driver.returncode}, status {state['status']}: {err[-300:]}"
    return None


def copied_folder_resumes_as_itself(data: Path, tmp: Path) -> str | None:
    """SIGINT a search, `cp -a` its folder, resume the copy: only the copy changes; `mv` and resume again."""
    out = tmp / "out"
    driver = subprocess.Popen(_search_command(data, out, "copyme", 3000), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        if not _started(out, driver):
            return f"the search did not start: {driver.communicate()[1][-300:]}"
        driver.send_signal(signal.SIGINT)
        driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    copy, moved = tmp / "copy", tmp / "moved"
    shutil.copytree(out, copy, symlinks=True)
    before = snapshot(out)
    done = subprocess.run([LTH_SEARCH, "resume", "copyme", "--output-dir", str(copy)], capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        return f"resume of the copy: exit {done.returncode}: {done.stderr[-300:]}"
    if snapshot(out) != before:
        return "resuming the copy changed the original"
    shutil.move(out, moved)
    done = subprocess.run([LTH_SEARCH, "resume", "copyme", "--output-dir", str(moved)], capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0 or out.exists():
        return f"resume after mv: exit {done.returncode}, old folder back: {out.exists()}: {done.stderr[-300:]}"
    status = json.loads((moved / "searches" / "copyme" / "search.json").read_text())["status"]
    return None if status == "finished" else f"moved search is {status}"


def _trial_workers(driver: subprocess.Popen) -> list:
    """The `ray::ImplicitFunc` processes of the Ray a driver started (its descendants)."""
    import psutil  # noqa: PLC0415 - a dependency of Ray's

    found = []
    for child in psutil.Process(driver.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any("ray::ImplicitFunc" in part for part in child.cmdline()):
                found.append(child)
    return found


def killed_trial_worker(data: Path, tmp: Path) -> str | None:
    """SIGKILL a trial's worker process mid-stage: one console line, a retry, the search finishes."""
    out = tmp / "out"
    driver = subprocess.Popen(_search_command(data, out, "killed", 3000), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        if not _started(out, driver):
            return f"the search did not start: {driver.communicate()[1][-300:]}"
        workers = _trial_workers(driver)
        if not workers:
            return "no trial worker to kill"
        workers[0].kill()
        _, err = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    if driver.returncode != 0 or "Traceback" in err or "A worker died or was killed" in err:
        return f"exit {driver.returncode}: {err[-400:]}"
    return None if "failed (its worker process died" in err else f"no one-line account of the death: {err[-400:]}"


def store_turned_read_only(data: Path, tmp: Path) -> str | None:
    """The store becomes read-only mid-search: one line, exit 1, search.json `failed`; resume finishes it."""
    out = tmp / "out"
    store = out / "store"
    store.mkdir(parents=True)
    if subprocess.run(["mount", "--bind", str(store), str(store)], capture_output=True).returncode != 0:
        return "skip: this machine refuses a bind mount (needs root)"
    driver = subprocess.Popen(_search_command(data, out, "rostore", 3000), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        if not _started(out, driver):
            return f"the search did not start: {driver.communicate()[1][-300:]}"
        subprocess.run(["mount", "-o", "remount,ro,bind", str(store)], check=True)
        _, err = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        subprocess.run(["umount", "-l", str(store)], capture_output=True)
    lines = [line for line in err.splitlines() if line.strip()]
    problem = one_line(driver.returncode, lines[-1] if lines else "", 1, "Read-only file system")
    if problem or "Traceback" in err:
        return problem or f"traceback: {err[-400:]}"
    state = json.loads((out / "searches" / "rostore" / "search.json").read_text())
    if state["status"] != "failed":
        return f"search.json says {state['status']}"
    done = subprocess.run([LTH_SEARCH, "resume", "rostore", "--output-dir", str(out)], capture_output=True,
                          text=True, timeout=600)
    return None if done.returncode == 0 else f"resume: exit {done.returncode}: {done.stderr[-300:]}"


SEARCH: dict[str, Drill] = {
    "second driver refused, SIGTERM is an interrupt": second_driver_and_sigterm,
    "copied and moved folders resume as themselves": copied_folder_resumes_as_itself,
    "a killed trial worker is one line and a retry": killed_trial_worker,
    "a store turned read-only stops the search in one line; resume finishes": store_turned_read_only,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search", action="store_true", help="also the drills that start Ray (minutes)")
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    args = parser.parse_args()
    from lth_search.config import DataConfig  # noqa: PLC0415 - after --help, which needs no torch
    from lth_search.engine.data import load_dataset  # noqa: PLC0415

    import torch  # noqa: PLC0415

    torch.set_num_threads(1)
    chosen = {**table_drills(), **ISSUE_22, **(SEARCH if args.search else {})}
    chosen = {name: drill for name, drill in chosen.items() if args.only in name}
    tried = held = skipped = 0
    began = time.time()
    with tempfile.TemporaryDirectory(prefix="lth-drills-") as scratch:
        data = Path(scratch) / "data"
        load_dataset(DataConfig(root=str(data)), seed=0)
        for index, (name, drill) in enumerate(chosen.items()):
            tmp = Path(scratch) / f"case{index}"
            tmp.mkdir()
            try:
                problem = drill(data, tmp)
            except BaseException as error:  # noqa: BLE001 - a drill that raised did not hold
                if isinstance(error, KeyboardInterrupt):
                    raise
                problem = "".join(traceback.format_exception_only(error)).strip()[:1500]
            if problem is not None and problem.startswith("skip: "):
                skipped += 1
                print(f"skip  {name}: {problem[6:]}", flush=True)
                continue
            tried += 1
            held += problem is None
            print(f"{'held' if problem is None else 'FAIL'}  {name}" + (f": {problem}" if problem else ""), flush=True)
    print(f"tried {tried}, held {held}, skipped {skipped} ({time.time() - began:.0f} s)")
    return 0 if held == tried else 1


if __name__ == "__main__":
    sys.exit(main())
