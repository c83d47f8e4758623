"""Fault drills (issue 12): try every bad input and machine fault we know; print tried / held.

A case *holds* when lth-search answers as promised: one `lth-search: error:` line naming
the key, file or name (exit 2 for input, 1 for a runtime failure, 130 for an interrupt),
no traceback, nothing half-written, no hang, no lost result, and a fault the machine
recovers from is recovered from (a corrupt stage recomputed, a dead lease holder's
stage taken over, a full disk resumed).

The cases are the tables and tests of tests/test_faults.py (run here without pytest, on
fresh temporary folders) plus a few more below: a flipped byte in a stored weight file,
a truncated manifest, a malicious pickle as a CIFAR batch, an MLflow server that does
not answer, SIGTERM during a lineage. The disk-full search (tests/test_faults_search.py)
needs a Ray instance and runs with `--search`.

    python bench/drills.py [--search] [--only SUBSTRING]
"""

from __future__ import annotations

import argparse
import inspect
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

import _pytest.outcomes  # noqa: E402  (pytest.skip inside a drill means: cannot be tried here)
import torch  # noqa: E402

torch.set_num_threads(1)

import test_faults as drills  # noqa: E402
from fault_helpers import one_line_error, run_cli, snapshot  # noqa: E402
from lth_search.config import DataConfig  # noqa: E402
from lth_search.engine.data import load_dataset  # noqa: E402
from lth_search.errors import DataError  # noqa: E402
from lth_search.store.content_keys import content_key  # noqa: E402
from lth_search.store.stage_store import StageStore  # noqa: E402

Drill = Callable[[Path, Path], "str | None"]
"""(data root, a fresh folder) -> None if the case held, else what went wrong."""


def table_drills() -> dict[str, Drill]:
    """The bad-input tables of tests/test_faults.py, each case run through `cli.main` in-process."""
    cases: dict[str, Drill] = {}
    for case, sets, needle in drills.INPUT_CASES:
        def lineage_case(data: Path, tmp: Path, sets=sets, needle=needle) -> str | None:
            before = snapshot(tmp)
            code, out, err = run_cli(drills.lineage_args(data, tmp / "out", sets))
            return one_line_error(code, err, 2, needle) or (None if out == "" and snapshot(tmp) == before else "wrote")
        cases[f"input {case}"] = lineage_case
    for case, text, needle in drills.FILE_CASES:
        def file_case(data: Path, tmp: Path, case=case, text=text, needle=needle) -> str | None:
            (tmp / "bad.yaml").write_bytes(text.encode("latin1") if case.endswith("not text") else text.encode())
            code, _, err = run_cli(["lineage", str(tmp / "bad.yaml"), "--set", f"output_dir={tmp / 'out'}"])
            return one_line_error(code, err, 2, needle) or (None if not (tmp / "out").exists() else "wrote")
        cases[f"file {case}"] = file_case
    for case, args, needle, exit_code in drills.COMMAND_CASES:
        def command_case(data: Path, tmp: Path, args=args, needle=needle, exit_code=exit_code, case=case) -> str | None:
            drills.write_damaged_states(tmp / "out")
            code, _, err = run_cli([a.format(out=tmp / "out") for a in args])
            if case.startswith("usage"):
                return None if code == 2 and "Traceback" not in err else f"exit {code}: {err[-200:]}"
            return one_line_error(code, err, exit_code, needle)
        cases[f"command {case}"] = command_case
    return cases


def test_drills(search: bool) -> dict[str, Drill]:
    """Every other test of tests/test_faults.py (and the disk-full search with --search), called directly."""
    modules = [drills]
    if search:
        import test_faults_search

        modules.append(test_faults_search)
    cases: dict[str, Drill] = {}
    for module in modules:
        for name, test in vars(module).items():
            if not name.startswith("test_") or name in ("test_bad_input", "test_bad_config_file", "test_bad_command"):
                continue
            if getattr(test, "__module__", None) != module.__name__:
                continue

            def run(data: Path, tmp: Path, test=test) -> str | None:
                kwargs = {"data_root": data, "tmp_path": tmp, "ray_local": None}
                params = inspect.signature(test).parameters
                if "ray_local" in params:
                    _ray()
                test(**{p: kwargs[p] for p in params})
                return None
            cases[name.removeprefix("test_").replace("_", " ")] = run
    return cases


def _ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False,
                 _node_ip_address="127.0.0.1")


# More drills ---------------------------------------------------------------------------------------
def flipped_byte_in_a_weight_file(data: Path, tmp: Path) -> str | None:
    store = StageStore(str(tmp / "store"))
    key = content_key({"flip": "weights"})
    store.put(drills._entry(key))
    weights = next(Path(store._entry_dir(key)).glob("weights_*"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01
    weights.write_bytes(bytes(blob))
    entry, reused = store.get_or_compute(key, lambda: drills._entry(key))
    return None if not reused and store.get(key) is not None else "a corrupt weight file was used"


def truncated_manifest(data: Path, tmp: Path) -> str | None:
    store = StageStore(str(tmp / "store"))
    key = content_key({"truncated": "manifest"})
    store.put(drills._entry(key))
    manifest = Path(store._entry_dir(key)) / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])
    return None if store.get(key) is None and not store.contains(key) else "a truncated manifest was used"


def garbage_trial_record(data: Path, tmp: Path) -> str | None:
    store = StageStore(str(tmp / "store"))
    store.put_record("search-x", "good", {"trial_id": "good"})
    (tmp / "store" / "records" / "search-x" / "bad.json").write_bytes(b"\x00\xff not json")
    (tmp / "store" / "records" / "search-x" / "list.json").write_text("[1, 2]")
    unreadable: list[str] = []
    records = store.records("search-x", unreadable)
    ok = sorted(records) == ["good"] and sorted(unreadable) == ["bad", "list"] and store.record("search-x", "list") is None
    return None if ok else f"records {sorted(records)}, unreadable {unreadable}"


class _Payload:
    def __reduce__(self):  # what an attacker's "CIFAR batch" runs on unpickling
        return (os.system, ("touch /tmp/lth-drill-pwned",))


def malicious_cifar_batch(data: Path, tmp: Path) -> str | None:
    from lth_search.engine.data_files import read_cifar_batch

    path = tmp / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Payload(), b"labels": []}, protocol=2))
    try:
        read_cifar_batch(path)
    except DataError as error:
        if Path("/tmp/lth-drill-pwned").exists():
            return "the payload ran"
        return None if str(path) in str(error) else f"message lacks the file: {error}"
    return "a malicious pickle was accepted"


def mlflow_server_that_does_not_answer(data: Path, tmp: Path) -> str | None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing answers there
    sets = ["tracking.enabled=true", f"tracking.uri=http://127.0.0.1:{port}"]
    code, out, err = run_cli(drills.lineage_args(data, tmp / "out", sets) + ["--json"])
    if code != 0 or '"rounds"' not in out or "Traceback" in err:
        return f"exit {code}: {err[-300:]}"
    return None


DRILLS: dict[str, Drill] = {
    "flipped byte in a stored weight file": flipped_byte_in_a_weight_file,
    "truncated manifest": truncated_manifest,
    "garbage and non-object trial records": garbage_trial_record,
    "malicious pickle as a CIFAR batch": malicious_cifar_batch,
    "MLflow server that does not answer": mlflow_server_that_does_not_answer,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search", action="store_true", help="also the disk-full search (starts a local Ray)")
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    args = parser.parse_args()
    cases = {**table_drills(), **test_drills(args.search), **DRILLS}
    cases = {name: drill for name, drill in cases.items() if args.only in name}
    tried = held = skipped = 0
    began = time.time()
    with tempfile.TemporaryDirectory(prefix="lth-drills-") as scratch:
        data = Path(scratch) / "data"
        load_dataset(DataConfig(root=str(data)), seed=0)
        for index, (name, drill) in enumerate(cases.items()):
            tmp = Path(scratch) / f"case{index}"
            tmp.mkdir()
            try:
                problem = drill(data, tmp)
            except _pytest.outcomes.Skipped as skip:
                skipped += 1
                print(f"skip  {name}: {skip}", flush=True)
                continue
            except BaseException as error:  # noqa: BLE001 - a drill that raised did not hold
                problem = "".join(traceback.format_exception_only(error)).strip()[:1500]
            tried += 1
            held += problem is None
            print(f"{'held' if problem is None else 'FAIL'}  {name}" + (f": {problem}" if problem else ""), flush=True)
    print(f"tried {tried}, held {held}, skipped {skipped} ({time.time() - began:.0f} s)")
    return 0 if held == tried else 1


if __name__ == "__main__":
    sys.exit(main())
