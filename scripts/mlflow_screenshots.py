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
import socket
import subprocess
import sys
import tempfile
import time
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
                              env={**__import__("os").environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
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


def click_text(driver: webdriver.Chrome, text: str, tag: str = "*") -> None:
    element = WebDriverWait(driver, 30).until(ready.element_to_be_clickable(
        (By.XPATH, f"//{tag}[normalize-space(.)='{text}']")))
    element.click()


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
        driver = browser(1600, 1000)
        try:
            base = f"http://127.0.0.1:{port}"
            from mlflow import MlflowClient

            experiment = MlflowClient(base).get_experiment_by_name(args.experiment).experiment_id
            driver.get(f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning")
            wait_text(driver, f"{args.experiment} search")
            expanders = driver.find_elements(By.CSS_SELECTOR, "[data-testid='runs-table-expand-button'], "
                                                              "button[aria-label*='xpand']")
            for button in expanders[:1]:
                button.click()
            time.sleep(2)  # let the table settle after expanding (rendering only, no data wait)
            body = driver.find_element(By.TAG_NAME, "body").text
            missing = [word for word in ("Models", "Dataset", "best_ticket", "mnist1d") if word not in body]
            driver.save_screenshot(str(args.out / "mlflow-runs.png"))
            click_text(driver, "Chart")
            time.sleep(2)
            search = WebDriverWait(driver, 30).until(ready.element_to_be_clickable(
                (By.CSS_SELECTOR, "input[placeholder*='Search']")))
            search.send_keys("by_sparsity/val_accuracy")
            wait_text(driver, "by_sparsity/val_accuracy")
            time.sleep(3)
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
