"""Real faults for the drills: a small tmpfs that fills up, the CLI run in-process, one-line checks.

A tmpfs is a real filesystem with a real size limit: writing past it raises ENOSPC from
the kernel, exactly as a full disk does. Mounting needs root (or CAP_SYS_ADMIN); where
that is not allowed the drills that need it are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Iterator

from lth_search import cli


class MountRefused(Exception):
    """This machine does not let the tests mount a tmpfs (the reason is the message)."""


@contextlib.contextmanager
def tmpfs(path: Path, size_kb: int) -> Iterator[Path]:
    """A tmpfs of `size_kb` KiB mounted at `path` for the block; unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise MountRefused(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path, leave_kb: int) -> Path:
    """Fill the filesystem of `folder` until about `leave_kb` KiB are free; returns the ballast file."""
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    ballast = folder / "ballast"
    ballast.write_bytes(b"\0" * max(0, free - leave_kb * 1024))
    return ballast


def run_cli(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lth-search ARGS` run in this process through `cli.main`,
    in folder `cwd` and with `env` added to the environment when given (both restored after).

    stderr is what the console script would print there: what is written to sys.stderr, and
    the log records of WARNING and above, one message a line (the console script configures
    no logging, so Python's last-resort handler prints exactly those; under pytest its
    logging plugin would take them instead). Plain Python: bench/drills.py runs it without pytest.
    """
    out, err = io.StringIO(), io.StringIO()
    last_resort = logging.StreamHandler(err)
    last_resort.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(last_resort)
    saved_env = {k: os.environ.get(k) for k in env or {}}
    saved_cwd = os.getcwd()
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(args)
            except SystemExit as exit_:  # argparse's usage errors
                code = int(exit_.code or 0)
    finally:
        os.chdir(saved_cwd)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        root.removeHandler(last_resort)
    return code, out.getvalue(), err.getvalue()


def one_line_error(code: int, stderr: str, expected_code: int, needle: str) -> str | None:
    """None if `stderr` is one `lth-search: error:` line holding `needle` and the code is right; else why not."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if code != expected_code:
        return f"exit code {code}, expected {expected_code}: {stderr[-300:]}"
    if "Traceback" in stderr:
        return f"traceback: {stderr[-300:]}"
    if len(lines) != 1 or not lines[0].startswith("lth-search: error:"):
        return f"not one error line: {stderr[:300]!r}"
    if needle not in lines[0]:
        return f"{needle!r} not in {lines[0][:300]!r}"
    if len(lines[0]) > 1000:
        return f"error line of {len(lines[0])} characters"
    return None


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def live_pids(marker: str) -> list[int]:
    """Live (not zombie) processes carrying `marker` in their environment: the driver and
    every Ray process it started (they inherit the driver's environment)."""
    needle, pids = marker.encode(), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle not in (proc / "environ").read_bytes():
                continue
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone while we looked, or not ours to read
        if state != "Z":
            pids.append(int(proc.name))
    return pids


def kill_with_its_ray(driver: subprocess.Popen, marker: str) -> None:
    """SIGKILL a search's driver, then what its Ray's processes would do once they notice (within a
    minute on a loaded machine): they are killed too, and waited for, so what is stored is final."""
    from conftest import wait_for

    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    for pid in live_pids(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not live_pids(marker), 120, "the dead driver's Ray processes to exit", poll=0.2)
