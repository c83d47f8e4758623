"""moto's S3 server on loopback, started and stopped by its pid: for tests/test_s3_resume.py and
the drills in bench/ (bench/s3_scale.py), which need a real S3 API and nothing outside 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from conftest import wait_for
from ray_head import free_port

BUCKET = "lth-store"
MOTO = str(Path(sys.executable).with_name("moto_server"))


@contextlib.contextmanager
def moto_s3(folder: Path) -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 (own session, stopped by its pid) with the bucket `BUCKET`;
    yields the environment that points AWS clients (pyarrow, boto3) at it, and sets it in this
    process while it runs (this process reads the store too)."""
    port = free_port()
    log = open(folder / "moto.log", "w")
    server = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def answers() -> bool:
        assert server.poll() is None, "moto_server exited"
        try:
            with urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=2):
                return True
        except OSError:
            return False

    saved = {key: os.environ.get(key) for key in env}
    try:
        wait_for(answers, 60, "moto's S3 server", poll=0.2)
        os.environ.update(env)
        pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(BUCKET)
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
