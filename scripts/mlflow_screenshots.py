"""The README's MLflow screenshots, taken in headless Chromium after a search.

    python scripts/mlflow_screenshots.py lth_runs/mlflow.db docs/img

Starts `mlflow server` on loopback over the database, opens the runs table of the
experiment with its search expanded (Models, Dataset and Source columns in view), then
the chart view filtered to `by_sparsity` (accuracy against sparsity, dense point at 0),
and saves `mlflow-runs.png` and `mlflow-charts.png`. Needs `selenium` and a Chromium
with its driver (Debian: `apt-get install chromium chromium-driver`). It also checks
what the README promises is on screen and exits non-zero when it is not.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import os
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ready
from selenium.webdriver.support.ui import WebDriverWait


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(database: Path, port: int, folder: Path) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow if mlflow.exists() else "mlflow"), "server", "--backend-store-uri",
               f"sqlite:///{database.resolve()}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(folder / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            server.poll()
            if server.returncode is not None:
                raise SystemExit(f"mlflow server exited: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    server.kill()
    raise SystemExit("mlflow server did not answer within 120 s")


def browser(width: int, height: int) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    if Path("/usr/bin/chromium").exists():
        options.binary_location = "/usr/bin/chromium"
    service = webdriver.ChromeService("/usr/bin/chromedriver") if Path("/usr/bin/chromedriver").exists() else None
    return webdriver.Chrome(options=options, service=service)


def wait_text(driver: webdriver.Chrome, text: str, timeout: float = 60) -> None:
    WebDriverWait(driver, timeout).until(lambda d: text in d.find_element(By.TAG_NAME, "body").text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--experiment", default="quickstart")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="lth-shots-") as tmp:
        server = start_server(args.database, port, Path(tmp))
        driver = browser(1900, 1000)
        try:
            base = f"http://127.0.0.1:{port}"
            query = urllib.parse.urlencode({"experiment_name": args.experiment})
            with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?{query}", timeout=30) as answer:
                experiment = json.loads(answer.read())["experiment"]["experiment_id"]
            runs = f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning"
            driver.get(runs)
            wait_text(driver, f"{args.experiment} search")
            for close in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
                close.click()  # the MLflow Assistant panel
            parent = driver.find_element(By.XPATH, f"//a[normalize-space(.)='{args.experiment} search']"
                                                   "/ancestor::*[@role='row'][1]")
            parent.find_element(By.CSS_SELECTOR, "button").click()  # expand: the lineages under the search
            WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "[role='row']")) > 3)
            body = driver.find_element(By.TAG_NAME, "body").text
            missing = [word for word in ("Models", "Dataset", "best_ticket", "mnist1d", "lth-sea") if word not in body]
            driver.save_screenshot(str(args.out / "mlflow-runs.png"))
            driver.get(runs + "&compareRunsMode=CHART")
            search = WebDriverWait(driver, 60).until(ready.element_to_be_clickable(
                (By.CSS_SELECTOR, "input[placeholder='Search metric charts']")))
            search.send_keys("by_sparsity")
            wait_text(driver, "by_sparsity/val_accuracy")
            WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "svg .scatterlayer")) >= 2)
            driver.save_screenshot(str(args.out / "mlflow-charts.png"))
        finally:
            driver.quit()
            server.terminate()
            server.wait(timeout=30)
    if missing:
        print(f"not on the runs table screenshot: {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"wrote {args.out / 'mlflow-runs.png'} and {args.out / 'mlflow-charts.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
