"""A real Ray cluster on loopback, as `ray start` makes one: a head with its dashboard, and
optionally worker nodes joined to it with `ray start --address` (each a node of its own).

`ray start --block` keeps every Ray process of its node as its child, in a session of its
own, so each node is stopped by signalling that process group: never `ray stop`, which
stops every Ray process on the machine by name, other people's too. Ports are picked
free, so parallel sessions on one machine do not collide.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from conftest import wait_for

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayHead:
    process: subprocess.Popen
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]
    temp_dir: str
    workers: list[tuple[subprocess.Popen, str]] = field(default_factory=list)
    """The worker nodes' `ray start --block` processes and their temp dirs."""

    def node_ids(self) -> set[str]:
        """The cluster's alive node ids, from the dashboard's state API."""
        with urllib.request.urlopen(f"{self.dashboard_url}/api/v0/nodes", timeout=10) as response:
            nodes = json.loads(response.read())["data"]["result"]["result"]
        return {n["node_id"] for n in nodes if n["state"] == "ALIVE"}

    def stop(self) -> None:
        """The worker nodes, then the head: each `ray start --block` session gets SIGTERM (it stops its
        children), SIGKILL if it lingers."""
        for process, temp_dir in self.workers:
            _stop_session(process, temp_dir)
        _stop_session(self.process, self.temp_dir)

    def add_node(self, num_cpus: int = 1, timeout_s: float = 120.0) -> None:
        """Join one more node (`ray start --address`) and return once the head counts it alive."""
        temp_dir = tempfile.mkdtemp(prefix="lthray")
        command = [
            RAY, "start", f"--address={self.gcs_address}", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", f"--dashboard-agent-listen-port={free_port()}",
            f"--object-store-memory={150 * 2**20}", f"--temp-dir={temp_dir}",
        ]
        log = open(Path(temp_dir) / "ray-start.log", "w")
        process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append((process, temp_dir))

        def joined() -> bool:
            if process.poll() is not None:
                log_text = (Path(temp_dir) / "ray-start.log").read_text()
                raise RuntimeError(f"ray start --address exited: {log_text[-2000:]}")
            return len(self.node_ids()) == 1 + len(self.workers)  # the head and every worker node

        wait_for(joined, timeout_s, "the new node to be alive in the cluster", poll=0.5)


def _stop_session(process: subprocess.Popen, temp_dir: str) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_head(num_cpus: int = 2, worker_nodes: int = 0, timeout_s: float = 120.0) -> RayHead:
    """Start the cluster (a head of `num_cpus` CPUs, and `worker_nodes` nodes of one CPU each) and
    return once its job API answers (the event `ray job submit` needs) and every node is alive."""
    gcs, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="lthray")  # short: Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # no 30 s drain at SIGTERM: nothing to hand over
    env.pop("RAY_ADDRESS", None)
    command = [
        RAY, "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--num-cpus={num_cpus}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
        f"--object-store-memory={150 * 2**20}", f"--temp-dir={temp_dir}",
    ]
    log = open(Path(temp_dir) / "ray-start.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(process, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", env, temp_dir)
    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"ray start --head exited: {(Path(temp_dir) / 'ray-start.log').read_text()[-2000:]}")
        return _answers(f"{head.dashboard_url}/api/version")

    try:
        wait_for(up, timeout_s, "the dashboard's job API", poll=0.5)
        for _ in range(worker_nodes):
            head.add_node(1, timeout_s)
    except BaseException:
        head.stop()
        raise
    return head
