"""Shared fixtures: one real local Ray per test session, real Parquet files in tmp dirs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import generate
from pipeline.config import CampaignConfig, SendConfig

ROOT = Path(__file__).resolve().parent.parent

# Every Ray the tests start (in this process or in CLI subprocesses, which inherit this) binds to
# 127.0.0.1 only, not the machine's primary interface. Read by Ray at import time.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# Keep Ray's temp files short and private to the test run.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """Ray starts once per session (3-5 s each time on this machine, docs/ray-notes.md)."""
    import ray
    # 8 logical CPUs on 2 cores: sender actors are I/O-bound and ask for 0.25 each.
    # address="local": without it ray.init joins a Ray already running here (another run's).
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level=logging.WARNING)
    from ray.data import DataContext
    DataContext.get_current().enable_progress_bars = False
    yield
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
                                    "dry_run") if k in opts}
    top.setdefault("campaign", "test")
    top.setdefault("charts", False)
    return CampaignConfig(input=str(input_path), runs_dir=str(tmp_path / "runs"),
                          data_dir=str(tmp_path / "data"), dashboard=False,
                          send=SendConfig(**opts), **top)


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a fresh process."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "pipeline.run", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def read_ledger(tmp_path: Path, name: str = "test") -> pl.DataFrame:
    return pl.read_parquet(tmp_path / "runs" / name / "ledger.parquet")
