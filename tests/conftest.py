"""Shared fixtures: one real local Ray per test session, real Parquet files in tmp dirs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import generate
from pipeline.config import CampaignConfig, SendConfig

ROOT = Path(__file__).resolve().parent.parent


def from_scripts(module: str) -> Any:
    """A module of scripts/ (the benchmarks' and the lab's servers), imported by name."""
    import importlib
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(ROOT / "scripts"))

# The Ray this process starts binds to 127.0.0.1 only, not the machine's primary interface
# (read by Ray at import time). CLI runs do not inherit it: they set it themselves (cli_env).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# Token authentication on for this process's Ray, as a CLI run's own Ray has it
# (ray_session.prepare_import); it also keeps Ray from warning that it turned the mode on. CLI
# runs joining it present the token because the run sets the mode itself (cli_env drops this).
os.environ.setdefault("RAY_AUTH_MODE", "token")

# Keep Ray's temp files short and private to the test run.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _start_ray() -> None:
    """This process starts the session's one local Ray (3-9 s each time on this machine,
    docs/ray-notes.md); tests use it in-process and CLI runs join it (`shared_ray_address`)."""
    import ray
    if ray.is_initialized():
        return
    # 4 logical CPUs on 2 cores: sender actors are I/O-bound and ask for 0.25 each (8 of them
    # and Ray Data's tasks fit). Not more: a joined run's tasks (the load's, the fold's) run as
    # many at once as there are CPUs, and each one without a worker of its own starts one (1-2 s
    # each on 2 cores); at 8 CPUs, with the per-block metadata tasks `from_arrow_refs` ran then,
    # a 3,000-row run spent 5-6 s there, at 4 CPUs 2.2-2.6 s.
    # address="local": without it ray.init joins a Ray already running here (another run's).
    # The system settings are the ones a CLI run gives the Ray it starts (ray_session.start).
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.WARNING,
             _system_config={"idle_worker_killing_time_threshold_ms": 60_000,
                             "enable_metrics_collection": False})
    from ray.data import DataContext
    DataContext.get_current().enable_progress_bars = False


def shared_ray_address() -> str:
    """The session's Ray, for CLI runs to join (`--address`): a run that starts its own Ray
    spends 9-11 s of a 2-core machine on starting and stopping it (measured: a 3,000-row run
    took 40-44 s alone, 23 s joined). Tests about Ray's own start, logs or nodes start their own."""
    import ray
    _start_ray()
    return str(ray.get_runtime_context().gcs_address)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    _start_ray()
    yield


def pytest_sessionfinish(session: pytest.Session) -> None:
    if "ray" in sys.modules:
        import ray
        ray.shutdown()


def write_recipients(path: Path, rows: int, **kwargs: Any) -> Path:
    generate.generate(rows, **kwargs).write_parquet(path)
    return path


@pytest.fixture
def input_file(tmp_path: Path) -> Path:
    return write_recipients(tmp_path / "recipients.parquet", 2000)


def campaign(tmp_path: Path, input_path: Path | str, **send: Any) -> CampaignConfig:
    """A test campaign: short latency, no dashboard, no charts unless asked."""
    opts: dict[str, Any] = dict(actors=2, threads_per_actor=10, latency=0.01, cpus_per_actor=0.25)
    opts.update(send)
    top = {k: opts.pop(k) for k in ("campaign", "restart", "retry_failed", "suppress", "charts",
                                    "dry_run", "wave_rows") if k in opts}
    top.setdefault("campaign", "test")
    top.setdefault("charts", False)
    return CampaignConfig(input=str(input_path), runs_dir=str(tmp_path / "runs"),
                          data_dir=str(tmp_path / "data"), dashboard=False,
                          send=SendConfig(**opts), **top)


def cli_env(env: dict[str, str] | None, own_ray: bool | None) -> dict[str, str]:
    """The environment of a CLI run: it joins the session's Ray unless `own_ray`, or unless it
    is given variables of its own (`env`), which only reach the senders of a Ray it starts."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    # The run sets these itself, joining the session's Ray on 127.0.0.1 with its token or
    # starting its own (ray_session.prepare_import): left out, every CLI test checks that.
    for name in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE"):
        if name not in (env or {}):
            full_env.pop(name, None)
    if not (bool(env) if own_ray is None else own_ray):
        full_env["RAY_ADDRESS"] = shared_ray_address()
    return full_env


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, own_ray: bool | None = None,
        timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a fresh process."""
    return subprocess.run([sys.executable, "-m", "pipeline.run", *args], cwd=cwd,
                          env=cli_env(env, own_ray), capture_output=True, text=True,
                          timeout=timeout)


def read_ledger(tmp_path: Path, name: str = "test") -> pl.DataFrame:
    return pl.read_parquet(tmp_path / "runs" / name / "ledger.parquet")


S3_BUCKET = "bulkmail-test"


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """moto's S3 server on loopback, one for the session (its state is reset for each test)."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # Credentials come from a file every node can read (as ~/.aws/credentials on a real
    # cluster); only its path and the profile name travel to the actors, never the keys.
    credentials = tmp_path_factory.mktemp("aws") / "aws-credentials"
    credentials.write_text("[bulkmail-test]\naws_access_key_id = testing\n"
                           "aws_secret_access_key = testing\n")
    yield f"http://{host}:{port}", credentials
    server.stop()


@pytest.fixture
def s3(moto_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """An empty S3 (bucket S3_BUCKET) and the environment that points bulkmail, its actors and
    its subprocesses at it. moto keeps its state per process, not per server: reset it."""
    import boto3
    endpoint, credentials = moto_server
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"),
                           timeout=10).read()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1",
        "AWS_SHARED_CREDENTIALS_FILE": str(credentials), "AWS_PROFILE": "bulkmail-test",
        # moto's server stores the SDK's default streamed (aws-chunked) checksums verbatim,
        # corrupting every object pyarrow writes; older MinIO does the same.
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probe for credentials
    }.items():
        monkeypatch.setenv(key, value)
    # A fresh session: boto3's default one keeps the profile settings it first saw.
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=S3_BUCKET)
    yield client


def run_then_stop(engine: Any, messages: list[Any], *, after: float = 1.2) -> Any:
    """Run `messages` through `engine` on a thread, stop the engine `after` seconds in, and
    return the batch's counts; the stop must take effect within 2 s."""
    import threading
    import time
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(engine.run(messages)))
    t.start()
    time.sleep(after)
    t0 = time.time()
    engine.stop()
    t.join(timeout=5)
    assert not t.is_alive() and time.time() - t0 < 2
    return result[0]
