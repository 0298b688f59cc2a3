"""Screenshots of the Ray dashboard during a real bulkmail run: the Actors page and the job's page.

    python scripts/dashboard_screenshot.py                     # writes docs/dashboard-*.png
    python scripts/dashboard_screenshot.py --out-dir /tmp/shots --rows 150000 --actors 4

Needs Chromium, its driver and selenium (none of them a project dependency):

    apt-get install -y chromium chromium-driver && pip install selenium

What it does:
1. generates `--rows` recipients into a temporary Parquet file and starts
   `python -m pipeline.run --campaign dashboard-demo ...` on it in a subprocess, with the Ray
   dashboard on and the fake sender slowed down (`--latency`), so the run lasts ~40-60 s;
2. reads the dashboard's address from the run's output (`Ray dashboard: http://...`) and the
   token that output says to sign in with, from `ray get-auth-token` (else ~/.ray/auth_token);
3. waits, through the dashboard's HTTP API, until the pool actors
   (`MapWorker(MapBatches(SendBatches[dashboard-demo]))`) are ALIVE;
4. drives headless Chromium (selenium, the Debian chromedriver; nothing is downloaded) with the
   dashboard's session cookie `ray-authentication-token` set, and saves
   - dashboard-actors.png: the Actors page, the pool actors ALIVE;
   - dashboard-jobs.png: the run's job page: RUNNING, the Ray Data overview opened on the
     dataset's operators (Input, MapBatches(SendBatches[dashboard-demo]): blocks done of
     all) and the Ray Core overview (tasks finished / running);
   while the run is still sending;
5. lets the run finish (SIGINT after `--run-timeout` seconds) and exits 0.

On failure it exits 1 with one line on stderr; the run and the browser are stopped either way.
The campaign's ledger goes to a temporary directory, deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CAMPAIGN = "dashboard-demo"
ACTOR_CLASS = f"MapWorker(MapBatches(SendBatches[{CAMPAIGN}]))"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
INSTALL_HINT = "apt-get install -y chromium chromium-driver && pip install selenium"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,900", "--hide-scrollbars"]


class Failure(Exception):
    """One line for the user: what failed."""


def log(message: str) -> None:
    print(f"dashboard_screenshot: {message}", file=sys.stderr, flush=True)


class Run:
    """The bulkmail run in a subprocess; a thread keeps its output (the last lines, for errors)."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.tail: deque[str] = deque(maxlen=20)
        self.dashboard_url: str | None = None
        self.url_seen = threading.Event()
        self._log = log_path.open("w", encoding="utf-8")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace", start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            line = line.rstrip()
            self.tail.append(line)
            if self.dashboard_url is None and line.startswith("Ray dashboard: "):
                self.dashboard_url = line.split(": ", 1)[1].strip().rstrip("/")
                self.url_seen.set()
        self.url_seen.set()  # output ended: whoever waits for the URL stops waiting

    def last_line(self) -> str:
        return next((t.strip() for t in reversed(self.tail) if t.strip()), "(no output)")

    def wait_for_url(self, timeout: float) -> str:
        self.url_seen.wait(timeout)
        if self.dashboard_url:
            return self.dashboard_url
        if self.proc.poll() is not None:
            raise Failure(f"the run exited ({self.proc.returncode}) before the dashboard started: "
                          f"{self.last_line()}")
        raise Failure(f"no 'Ray dashboard:' line from the run within {timeout:.0f} s")

    def finish(self, timeout: float) -> int:
        """Wait for the run to end; SIGINT (its graceful stop) after `timeout` seconds."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"the run is still going after {timeout:.0f} s: stopping it (SIGINT)")
            self.proc.send_signal(signal.SIGINT)
            return self.proc.wait(60)

    def stop(self) -> None:
        """Make sure the run is gone: SIGINT, then SIGTERM, then SIGKILL of its process group."""
        if self.proc.poll() is None:
            for sig, grace in ((signal.SIGINT, 60), (signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                try:
                    if sig == signal.SIGKILL:
                        os.killpg(self.proc.pid, sig)
                    else:
                        self.proc.send_signal(sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._reader.join(5)
        self._log.close()


def auth_token() -> str:
    """The token the run's output says to sign in with: `ray get-auth-token`, else the file."""
    ray_cli = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    try:
        out = subprocess.run([ray_cli, "get-auth-token"], capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[-1].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token").expanduser()
    try:
        token = path.read_text().strip()
    except OSError:
        token = ""
    if not token:
        raise Failure(f"no Ray auth token: `ray get-auth-token` printed none and {path} is empty")
    return token


def api_get(url: str, token: str) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def wait_for_pool(base: str, token: str, actors: int, run: Run, timeout: float) -> None:
    """Until the dashboard lists `actors` pool actors ALIVE (the run is sending by then)."""
    deadline = time.monotonic() + timeout
    alive = 0
    while time.monotonic() < deadline:
        if run.proc.poll() is not None:
            raise Failure(f"the run exited ({run.proc.returncode}) before its actors were up: "
                          f"{run.last_line()}")
        try:
            data = api_get(f"{base}/logical/actors", token)
            table = data.get("data", {}).get("actors", {}) or {}
            alive = sum(1 for a in table.values()
                        if a.get("className") == ACTOR_CLASS and a.get("state") == "ALIVE")
            if alive >= actors:
                return
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise Failure(f"the dashboard refused the token ({e.code} on /logical/actors)") from e
        except (OSError, ValueError):
            pass  # the dashboard is still starting
        time.sleep(1)
    raise Failure(f"{alive} of {actors} {ACTOR_CLASS} actors ALIVE after {timeout:.0f} s")


def running_job_id(base: str, token: str) -> str | None:
    """The run's job: the dashboard's own local Ray has one driver job, RUNNING."""
    try:
        jobs = api_get(f"{base}/api/jobs/", token)
    except (OSError, ValueError):
        return None
    running = [j for j in jobs if j.get("status") == "RUNNING" and j.get("job_id")]
    return running[-1]["job_id"] if running else None


def open_browser(profile: str) -> Any:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        raise Failure(f"selenium is not installed; install: {INSTALL_HINT}") from e
    for path in (CHROMEDRIVER, CHROMIUM):
        if not Path(path).is_file():
            raise Failure(f"{path} is missing; install: {INSTALL_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROME_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    # An explicit driver path: selenium-manager (which would download one) is never run.
    service = Service(executable_path=CHROMEDRIVER, log_output=subprocess.DEVNULL)
    return webdriver.Chrome(service=service, options=options)


def set_viewport(driver: Any, width: int, height: int) -> None:
    """The page's own size, exactly (--window-size counts the window, not the page)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})


def sign_in(driver: Any, base: str, token: str) -> None:
    """Set the cookie the dashboard's /api/authenticate would set, before any page loads."""
    host = base.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setCookie", {
        "name": "ray-authentication-token", "value": token, "domain": host, "path": "/",
        "httpOnly": True, "secure": False})


def wait_for_text(driver: Any, texts: list[str], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        try:
            body = driver.execute_script("return document.body ? document.body.innerText : ''") or ""
        except Exception:  # the page is navigating
            body = ""
        if all(t in body for t in texts):
            return
        time.sleep(0.5)
    hint = " (the page asks for a token: sign-in failed)" if "token" in body.lower() else ""
    raise Failure(f"{what} did not show {texts!r} within {timeout:.0f} s{hint}")


def click(driver: Any, xpath: str, texts: list[str], what: str) -> None:
    """Click what opens a collapsed part of the page, and wait for its content."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    try:
        driver.find_element(By.XPATH, xpath).click()
    except WebDriverException as e:
        raise Failure(f"nothing to click for {what}") from e
    wait_for_text(driver, texts, 30, what)


def shoot(driver: Any, url: str, texts: list[str], out: Path, what: str, settle: float,
          *, clicks: tuple[tuple[str, list[str], str], ...] = (), height: int = 900) -> None:
    set_viewport(driver, 1400, height)
    driver.get(url)
    wait_for_text(driver, texts, 60, what)
    for xpath, shown, part in clicks:
        click(driver, xpath, shown, part)
    time.sleep(settle)  # tables and charts fill in after the first text
    if not driver.save_screenshot(str(out)):
        raise Failure(f"could not write {out}")
    log(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs", help="where the PNGs go")
    p.add_argument("--rows", type=int, default=100_000,
                   help="recipients to send (100k: a run of ~40-60 s at the defaults on 2 cores)")
    p.add_argument("--actors", type=int, default=4, help="sender actors in the pool")
    p.add_argument("--threads-per-actor", type=int, default=50, help="sending threads per actor")
    p.add_argument("--latency", type=float, default=0.05, help="the fake sender's seconds per email")
    p.add_argument("--settle", type=float, default=4.0,
                   help="seconds to let a page fill in after its content appears")
    p.add_argument("--run-timeout", type=float, default=180.0,
                   help="seconds to let the run finish after the screenshots; then SIGINT")
    a = p.parse_args(argv)
    if a.rows < 1 or a.actors < 1:
        p.error("--rows and --actors must be positive")

    run: Run | None = None
    driver: Any = None
    tmp = tempfile.TemporaryDirectory(prefix="bulkmail-dashboard-")
    try:
        # Fail on a missing browser before spending a run on it.
        try:
            import selenium  # noqa: F401
        except ImportError as e:
            raise Failure(f"selenium is not installed; install: {INSTALL_HINT}") from e
        a.out_dir.mkdir(parents=True, exist_ok=True)
        from pipeline import generate
        data = Path(tmp.name) / "recipients.parquet"
        generate.generate(a.rows).write_parquet(data)
        cmd = [sys.executable, "-m", "pipeline.run", "--input", str(data), "--actors", str(a.actors),
               "--threads-per-actor", str(a.threads_per_actor), "--latency", str(a.latency),
               "--campaign", CAMPAIGN, "--runs-dir", str(Path(tmp.name) / "runs")]
        log(f"starting the run: {a.rows} recipients, {a.actors} actors")
        started = time.monotonic()
        run = Run(cmd, Path(tmp.name) / "run.log")
        base = run.wait_for_url(120)
        token = auth_token()
        wait_for_pool(base, token, a.actors, run, 120)
        job_id = running_job_id(base, token)

        driver = open_browser(str(Path(tmp.name) / "chrome-profile"))
        sign_in(driver, base, token)
        shoot(driver, f"{base}/#/actors", [f"SendBatches[{CAMPAIGN}]", "ALIVE"],
              a.out_dir / "dashboard-actors.png", "the Actors page", a.settle)
        if job_id:
            # The job's page: its status, the Ray Data overview (opened: the send stage's
            # operators, rows out) and the Ray Core overview (tasks and actor calls).
            data_section = ("//*[normalize-space(text())='Ray Data Overview']", ["Rows Outputted"],
                            "the Ray Data overview")
            dataset_row = ("//*[local-name()='svg'][*[local-name()='title']"
                           "[starts-with(., 'Expand Dataset')]]",
                           [f"SendBatches[{CAMPAIGN}]"], "the dataset's operators")
            shoot(driver, f"{base}/#/jobs/{job_id}", [job_id, "RUNNING", "Ray Data Overview"],
                  a.out_dir / "dashboard-jobs.png", "the job's page", a.settle,
                  clicks=(data_section, dataset_row), height=1100)
        else:
            shoot(driver, f"{base}/#/jobs", ["RUNNING"], a.out_dir / "dashboard-jobs.png",
                  "the Jobs page", a.settle)
        if run.proc.poll() is not None:
            raise Failure("the run ended while the screenshots were taken: they may not show it "
                          "sending; use more --rows")
        driver.quit()
        driver = None

        log("screenshots taken; letting the run finish")
        code = run.finish(a.run_timeout)
        if code not in (0, 130):  # 130: stopped by our SIGINT after --run-timeout
            raise Failure(f"the run exited with {code}: {run.last_line()}")
        log(f"the run ended (exit {code}) after {time.monotonic() - started:.0f} s")
        return 0
    except Failure as e:
        print(f"dashboard_screenshot: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dashboard_screenshot: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the browser or its driver: one line, not a traceback
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"dashboard_screenshot: error: {type(e).__name__}: {first}", file=sys.stderr)
        return 1
    finally:
        if driver is not None:
            try:
                driver.quit()
            except Exception:
                pass
        if run is not None:
            run.stop()
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
