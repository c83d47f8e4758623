"""Scale of the search driver: what a trial costs beyond its training, at N trials (issue 24).

For each N (default 100, 300, 1000) a fresh driver process runs a search of N trivial
trials through `lth_search.api.run_search` (Ray Tune, Optuna, the store, MLflow on sqlite:
the whole product) in a fresh temporary output_dir: the quickstart's MLP and data, 80
training steps a stage, 2 rounds, ASHA off, no confirmation, a 1008-recipe space (the
issue's 496 recipes would cap N at 496). It prints per N:

- fixed cost per trial per slot: (Tune's wall x slots - training) / N, the slot-seconds a
  trial costs that are not training (training = the unique stages' steps / steps per s,
  bench/search_overhead.py's `training_seconds`); Tune's wall runs from Tune's start to the
  summary (Ray's start and MLflow's setup are per search, not per trial);
- the driver's peak RSS (this child process's ru_maxrss);
- bytes written to the Optuna journal per trial (a local journal file is append-only, so
  its size; a store journal counts every object it writes);
- bytes written to MLflow per trial (mlflow.db plus the artifact folder beside it);
- the search overhead: wall / (training / slots), as bench/search_overhead.py prints it;
- CPU seconds of the driver and of Ray's processes (every process below the driver, sampled
  from /proc every half second) per trial beyond training: on a machine others load, wall time measures
  the load, CPU time the work. The sampler's own CPU is counted in the driver's and printed beside it.

    python bench/scale.py [--n 100 300 1000] [--store-uri URI] [--address ADDR] [--output-dir DIR]

`--address` runs the same searches on a cluster (give `--output-dir` on storage the
workers share, or `--store-uri`); `--store-uri local:///abs/folder` puts the store, and so
the journal, behind the object-store code path (`StoreJournalBackend`) on local disk.
Every line says the machine's load (os.getloadavg) before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NS = (100, 300, 1000)
RATES = [round(0.05 + 0.01 * i, 2) for i in range(63)]
"""63 rates x rewind 2 x scope 2 x init_scale 2 x output ratio 2 = 1008 recipes: a search runs at most
as many trials as its space has recipes (space.trial_budget), so N = 1000 needs that many."""


def trivial_overrides(n: int, output: Path, store_uri: str | None) -> list[str]:
    """The config of N trivial trials: stages of 80 steps, 2 rounds, no early stopping, no confirmation."""
    overrides = [
        "name=scale", f"output_dir={output}", f"search.num_trials={n}", "search.max_concurrent=2",
        "train.steps=80", "prune.rounds=2", "prune.rewind_steps=[0, 10]", "search.asha.enabled=false",
        "search.confirm_seeds=0", "search.report_seeds=0",
        f"search.space={json.dumps({'rewind_step': [0, 10], 'rate': RATES, 'scope': ['global', 'layerwise'], 'layer_ratios': {'output': [1.0, 0.5]}, 'init_scale': [0.0, 'measured']})}",
    ]
    return overrides + ([f"store.uri={store_uri}"] if store_uri else [])


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def count_journal_writes() -> dict[str, int]:
    """Bytes the store journal writes (each object it puts), counted around its `_put`."""
    import lth_search.search.journal as journal

    counted = {"bytes": 0, "writes": 0}
    write = journal._put

    def counting_write(uri: str, data: bytes, *args: object, **kwargs: object) -> object:
        counted["bytes"] += len(data)
        counted["writes"] += 1
        return write(uri, data, *args, **kwargs)

    journal._put = counting_write
    return counted


class RssTimeline:
    """The driver's resident memory every half second while a search runs: where in the search it peaks."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.ray_cpu: dict[int, float] = {}
        """CPU seconds by process below the driver (its local Ray)."""
        self.own_cpu_s = 0.0
        """CPU seconds of this sampler's thread, counted in the driver's CPU (it walks /proc every
        half second: ~10 % of the driver's samples under py-spy on a loaded machine)."""
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            with open("/proc/self/status") as status:
                kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            self.samples.append((time.perf_counter(), kb / 1024))
            self._descendants_cpu()
            self.own_cpu_s = time.thread_time()

    def _descendants_cpu(self) -> None:
        """CPU seconds of every process below this one (the local Ray's processes), the last seen of each."""
        parents, cpu = {}, {}
        for proc in os.listdir("/proc"):
            if proc.isdigit():
                try:
                    with open(f"/proc/{proc}/stat") as stat:
                        fields = stat.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parents[int(proc)] = int(fields[1])
                cpu[int(proc)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        mine = {os.getpid()}
        for pid in sorted(parents):  # parents mostly have lower pids; a second pass catches the rest
            if parents[pid] in mine:
                mine.add(pid)
        for pid in sorted(parents):
            if parents[pid] in mine:
                mine.add(pid)
        for pid in mine - {os.getpid()}:
            self.ray_cpu[pid] = max(self.ray_cpu.get(pid, 0.0), cpu[pid])

    def __enter__(self) -> "RssTimeline":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def quarters(self) -> list[float]:
        """RSS (MB) at 25, 50, 75 and 100 % of the search's wall time."""
        return [round(self.samples[min(len(self.samples) - 1, int(q * len(self.samples)))][1])
                for q in (0.25, 0.5, 0.75, 1.0)] if self.samples else []

    def peak_at(self) -> float:
        """When the RSS peaked, as a fraction of the search's wall time."""
        if not self.samples:
            return float("nan")
        start, end = self.samples[0][0], self.samples[-1][0]
        peak = max(self.samples, key=lambda sample: sample[1])[0]
        return (peak - start) / max(end - start, 1e-9)


def one(n: int, address: str | None, store_uri: str | None, output_dir: str | None, keep: bool) -> dict:
    """One search of n trials in this process (the driver); returns the measures as a dict."""
    from search_overhead import training_seconds

    from lth_search import api
    from lth_search.config import load_config
    from lth_search.runs.state import SearchState

    output = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="lth-scale-"))
    store = None
    if store_uri:
        store = f"{store_uri.rstrip('/')}/scale-{n}-{int(time.time())}"
    cfg = load_config(str(REPO / "configs" / "quickstart.yaml"), trivial_overrides(n, output, store))
    journal_writes = count_journal_writes()
    load_before = os.getloadavg()
    rss = RssTimeline()
    try:
        began = time.perf_counter()
        with rss:
            summary = api.run_search(cfg, address=address, progress=lambda _: None)
        wall = time.perf_counter() - began
        own = resource.getrusage(resource.RUSAGE_SELF)
        rss_mb = own.ru_maxrss / 1024
        local_store = Path(cfg.store_uri().removeprefix("local://"))
        train_s, steps, stages = training_seconds(local_store) if local_store.exists() else (float("nan"), 0, 0)
        state = SearchState.load(cfg.name, str(output), store_uri=store)
        journal_path = Path(state.journal)
        journal_bytes = journal_writes["bytes"] if journal_writes["writes"] else (
            journal_path.stat().st_size if journal_path.exists() else 0)
        mlflow_bytes = folder_bytes(output / "mlflow.db") + folder_bytes(output / "mlartifacts")
        slots = min(os.cpu_count() or 1, cfg.search.max_concurrent * cfg.resources.cpu)
        tune_wall = summary["wall_s"]
        return {
            "n": n, "trials": summary["trials"], "finished": summary["finished"], "wall_s": wall,
            "tune_wall_s": tune_wall, "train_s": train_s, "stages": stages, "steps": steps, "slots": slots,
            "fixed_s_per_trial_slot": (tune_wall * slots - train_s) / n,
            "overhead_ratio": wall / (train_s / slots), "tune_overhead_ratio": tune_wall / (train_s / slots),
            "driver_peak_rss_mb": rss_mb, "driver_cpu_s": own.ru_utime + own.ru_stime, "sampler_cpu_s": rss.own_cpu_s,
            "ray_cpu_s": sum(rss.ray_cpu.values()), "journal_bytes_per_trial": journal_bytes / n,
            "journal_writes": journal_writes["writes"], "mlflow_bytes_per_trial": mlflow_bytes / n,
            "rss_timeline_mb": rss.quarters(), "rss_peak_at": rss.peak_at(),
            "load_before": load_before, "load_after": os.getloadavg(), "output": str(output) if keep else None,
        }
    finally:
        if not keep and not output_dir:
            shutil.rmtree(output, ignore_errors=True)


def line(m: dict) -> str:
    load = "/".join(f"{x:.2f}" for x in m["load_before"]) + " -> " + "/".join(f"{x:.2f}" for x in m["load_after"])
    return (
        f"N={m['n']}: {m['trials']} trials ({m['finished']} finished) in {m['tune_wall_s']:.1f} s of Tune "
        f"({m['wall_s']:.1f} s run_search), {m['train_s']:.1f} s training on {m['slots']:g} slots; "
        f"fixed cost {m['fixed_s_per_trial_slot']:.3f} s/trial/slot; driver peak RSS {m['driver_peak_rss_mb']:.0f} MB "
        f"(at {100 * m['rss_peak_at']:.0f} % of the search; {m['rss_timeline_mb']} MB at 25/50/75/100 %); "
        f"journal {m['journal_bytes_per_trial']:.0f} B/trial ({m['journal_writes']} store writes); "
        f"MLflow {m['mlflow_bytes_per_trial'] / 1024:.1f} KB/trial; CPU {m['driver_cpu_s']:.0f} s driver "
        f"({m.get('sampler_cpu_s', 0):.0f} s of it this bench's sampler) + "
        f"{m['ray_cpu_s']:.0f} s Ray's processes = {(m['driver_cpu_s'] + m['ray_cpu_s'] - m['train_s']) / m['n']:.2f} "
        f"s/trial beyond training; overhead ratio {m['overhead_ratio']:.2f} "
        f"(run_search) / {m['tune_overhead_ratio']:.2f} (Tune); load {load}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=list(DEFAULT_NS), help="numbers of trials, one search each")
    parser.add_argument("--address", default=None, help="a Ray cluster's address (default: a local Ray per search)")
    parser.add_argument("--store-uri", default=None, help="a store URI root (default: <output_dir>/store)")
    parser.add_argument("--output-dir", default=None, help="where searches write (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep each search's temporary output_dir")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the driver process of one N
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.address, args.store_uri, args.output_dir, args.keep)))
        return 0
    rows = []
    for n in args.n:
        command = [sys.executable, __file__, "--one", str(n)]
        for flag, value in (("--address", args.address), ("--store-uri", args.store_uri),
                            ("--output-dir", args.output_dir and str(Path(args.output_dir) / f"n{n}"))):
            command += [flag, value] if value else []
        command += ["--keep"] if args.keep else []
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"N={n}: the search failed (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(line(rows[-1]), flush=True)
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        print(f"driver peak RSS N={last['n']} / N={first['n']}: {last['driver_peak_rss_mb'] / first['driver_peak_rss_mb']:.2f}; "
              f"journal B/trial: {last['journal_bytes_per_trial'] / max(first['journal_bytes_per_trial'], 1):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
