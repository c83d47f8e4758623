"""The killed-driver drill with the store on S3 (issue 21, acceptance 2), N times: print held / tried.

Each run is tests/test_s3_resume.py in a fresh pytest process: moto's S3 server on loopback, a
search with `store.uri=s3://lth-store/...`, its driver SIGKILLed with a trial half-way, `lth-search
resume` from another folder, and the check that it finished with no stage stored at the kill
trained again. A drill holds when that test passes.

    python bench/s3_drill.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}
    held = 0
    for run in range(1, args.runs + 1):
        began = time.time()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/test_s3_resume.py"], cwd=REPO, env=env, capture_output=True, text=True)
        held += done.returncode == 0
        verdict = "held" if done.returncode == 0 else "FAILED\n" + done.stdout[-3000:]
        print(f"run {run}: {verdict} ({time.time() - began:.0f} s)", flush=True)
    print(f"killed-driver drill, store on S3 (moto): {held}/{args.runs} held")
    return 0 if held == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
