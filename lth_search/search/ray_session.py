"""The Ray a search runs on: join a cluster, or start a local Ray on loopback, and stop it.

`--address` wins; else `RAY_ADDRESS` (what `ray job submit` sets for its entrypoint)
joins that cluster, as Ray's own default does; else a local Ray starts on loopback. A
wrong address or a trial that could never fit fails in one line before anything starts.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
from contextlib import contextmanager
from typing import Iterator

import ray

from lth_search.config import ExperimentConfig
from lth_search.errors import ConfigError


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: `--address`, else $RAY_ADDRESS (set by `ray job submit`), else None (local)."""
    return address or os.environ.get("RAY_ADDRESS") or None


@contextmanager
def ray_session(address: str | None, verbosity: int = 0) -> Iterator[None]:
    """Reuse an initialised Ray, join `address` or $RAY_ADDRESS, or start a local Ray on loopback.

    Ray started or joined here is shut down on exit; a Ray already up is left alone.
    Workers of a cluster do not share the driver's environment: the MLflow variables
    the driver sees (credentials, timeouts) go to them through the job's runtime env,
    unless this driver is itself a `ray job submit` entrypoint, whose runtime env
    (`--runtime-env-json`) already reaches every worker and may not be given twice.
    """
    if ray.is_initialized():
        yield
        return
    with _sigterm_kept():
        _init(address, verbosity)
    try:
        yield
    finally:
        if not cluster_address(address):
            _stop_autoscaler_monitor()
        ray.shutdown()


def _stop_autoscaler_monitor() -> None:
    """SIGKILL a local Ray's autoscaler monitor, before `ray.shutdown` stops the rest.

    ray.shutdown stops the head's processes one at a time, each given a second to exit on
    SIGTERM before it is killed. The monitor (which has nothing to scale on a local Ray of
    fixed size) uses the whole second: measured, raylet 0.03 s, GCS 0.02 s, monitor 1.01 s,
    1.37 s in all, every core idle. A SIGTERM'd monitor also reports "The autoscaler failed"
    through the raylet. Killed first, as it is after that second anyway, the shutdown takes
    0.15 s. Reaches Ray's private node state; a Ray without it shuts down as before.
    """
    node = getattr(ray._private.worker, "_global_node", None)
    processes = getattr(node, "all_processes", None) or {}
    for info in processes.get("monitor", []):  # ray_constants.PROCESS_TYPE_MONITOR
        process = getattr(info, "process", None)
        if process is not None and process.poll() is None:
            process.kill()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass  # ray.shutdown deals with it as it would have


@contextmanager
def _sigterm_kept() -> Iterator[None]:
    """Keep this process's SIGTERM handler across `ray.init`.

    ray.init installs its own SIGTERM handlers (a Python one that exits, and the core
    worker's native one that prints a stack and aborts: exit 134). The command line
    handles SIGTERM as SIGINT (cli.py: Tune stops, the search stays resumable, exit 130),
    so whatever handled SIGTERM before ray.init handles it after.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    except SystemExit as error:  # Ray's Python handler exits with the signal's number
        if error.code != signal.SIGTERM:
            raise
        raise KeyboardInterrupt from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _init(address: str | None, verbosity: int) -> None:
    """ray.init: join `address` / $RAY_ADDRESS, or start a local Ray on loopback."""
    # Workers' own lines (a stage wait, a library's warning) are not forwarded unless -v: the
    # console's status line says what they would (search/console.py), and a failed trial's
    # error is in its trial record and Ray's results.
    quiet = {"logging_level": logging.INFO if verbosity > 0 else logging.WARNING, "log_to_driver": verbosity > 0}
    joined = cluster_address(address)
    if joined:
        what = "--address" if address else "RAY_ADDRESS"
        check_reachable(address)
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by Ray for a job's entrypoint
        mlflow_env = {} if in_job else {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
        try:
            ray.init(address=joined, runtime_env={"env_vars": mlflow_env} if mlflow_env else None, **quiet)
        except ConnectionError as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(f"{what} {joined}: cannot join a Ray cluster there ({reason})") from None
    else:
        ray.init(
            address="local", num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", **quiet
        )


def check_reachable(address: str | None) -> None:
    """ConfigError when the cluster to join (--address, $RAY_ADDRESS) takes no connection: checked
    before a search writes anything (its lease, its store), and again by `ray_session`."""
    joined = cluster_address(address)
    why = unreachable(joined) if joined else None
    if why:
        what = "--address" if address else "RAY_ADDRESS"
        raise ConfigError(f"{what} {joined}: cannot join a Ray cluster there ({why})")


def unreachable(address: str, timeout_s: float = 5.0) -> str | None:
    """Why HOST:PORT takes no TCP connection, or None if it does.

    Ray itself retries an address that does not answer for minutes before it gives up;
    a wrong --address should fail in seconds. `auto` and other forms are left to Ray.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        return f"nothing answers at {host}:{port}: {error.strerror or type(error).__name__}"
    return None


def check_resources(cfg: ExperimentConfig, address: str | None) -> None:
    """Fail in one line, before anything starts, when a local Ray could never fit one trial.

    Only for a local Ray: the one this process would start, or one already initialised in
    it whose only node is this process's own (a notebook's `ray.init()`), whose resources
    are what Ray reports. A cluster may scale up to fit, so it is left to Ray (as is any
    Ray joined with --address).
    """
    if cluster_address(address):
        return
    if ray.is_initialized():
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        if nodes != [ray.get_runtime_context().get_node_id()]:
            return
        totals = ray.cluster_resources()
        available = {"CPU": totals.get("CPU", 0.0), "GPU": totals.get("GPU", 0.0)}
        where = "the Ray running in this process has"
    else:
        import torch

        available = {"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count() if torch.cuda.is_available() else 0}
        where = "this machine has"
    for key, need in (("CPU", cfg.resources.cpu), ("GPU", cfg.resources.gpu)):
        if need > available[key]:
            fits = available[key] if key == "CPU" else 0  # resources.cpu must stay > 0; gpu=0 trains on CPU
            raise ConfigError(
                f"resources.{key.lower()}: a trial needs {need:g} {key}s but {where} "
                f"{available[key]:g}; lower it (e.g. --set resources.{key.lower()}={fits:g}) or pass --address"
            )
