"""A simulated multi-node cluster (`ray.cluster_utils.Cluster`): a head that runs no senders, as
in cluster.yaml, and three sender nodes of 2 logical CPUs each. Each test runs
tests/drivers/multinode.py in its own process (a Cluster cannot share a process with the test
session's `ray.init`).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from .conftest import ROOT

DRIVER = ROOT / "tests" / "drivers" / "multinode.py"
pytestmark = pytest.mark.slow


def _drive(tmp_path: Path, *args: str, timeout: float = 240) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(DRIVER), "--workdir", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return facts


def _sends(send_log: str) -> collections.Counter[int]:
    return collections.Counter(int(line) for line in Path(send_log).read_text().split())


def test_sends_spread_over_every_sender_node_and_none_on_the_head(tmp_path: Path) -> None:
    rows = 3000
    facts = _drive(tmp_path, "--rows", str(rows), "--nodes", "3", "--metrics")
    led = pl.read_parquet(facts["ledger"])
    assert led.height == rows and sorted(led["id"].to_list()) == list(range(rows))
    assert (led["status"] == "sent").all()
    assert set(led["node"].unique().to_list()) == set(facts["workers"])  # all three, not the head
    per_node = led.group_by("node").len()["len"].to_list()
    assert min(per_node) > rows / 3 / 4  # really spread, not a token row on one node
    sends = _sends(facts["send_log"])
    assert sorted(sends) == list(range(rows)) and max(sends.values()) == 1

    # Ray metrics, labelled by actor, in the nodes' Prometheus exports. The ledger is the truth:
    # an actor's last second may not be exported before Ray Data stops the pool.
    per_actor = dict(led.group_by("actor").len().iter_rows())
    exported = facts["metrics_sent"]
    assert set(exported) == set(per_actor)
    assert all(0 < exported[a] <= per_actor[a] for a in per_actor)
    assert sum(exported.values()) >= rows / 2


def test_losing_a_node_mid_run_loses_no_recipient_and_repeats_within_the_bound(
        tmp_path: Path) -> None:
    rows, threads, latency, flush_s = 4000, 10, 0.1, 0.5
    # Batches of 1 s of an actor's sending (100 at 10 threads / 0.1 s), so a lost actor dies
    # with results recorded but not yet flushed, the case the bound is about.
    facts = _drive(tmp_path, "--rows", str(rows), "--nodes", "3", "--threads", str(threads),
                   "--latency", str(latency), "--batch-size", "100", "--remove-at", "0.3")
    removed = facts["removed"]
    assert removed["node"] == facts["workers"][-1]
    assert rows * 0.3 <= removed["at_lines"] < rows  # it happened mid-run

    led = pl.read_parquet(facts["ledger"])
    # Every recipient exactly once, each with a final status.
    assert led.height == rows and sorted(led["id"].to_list()) == list(range(rows))
    assert led["status"].is_in(["sent", "failed"]).all()
    assert facts["counts"]["reconciled"]
    # The lost node had senders, and the others finished its work.
    lost = led.filter(pl.col("node") == removed["node"])
    assert lost.height > 0
    assert led.filter(pl.col("node") != removed["node"]).height > rows - removed["at_lines"]

    # Repeats, counted from the sender's own log: at most what the lost actors had in flight
    # (threads each) plus what they had recorded but not yet flushed (one flush interval of
    # their sending, threads / latency emails a second each).
    sends = _sends(facts["send_log"])
    assert set(sends) == set(led.filter(pl.col("status") == "sent")["id"].to_list())
    repeated = sum(sends.values()) - len(sends)
    lost_actors = lost["actor"].n_unique()
    bound = lost_actors * (threads + flush_s * threads / latency)
    assert repeated <= bound, (repeated, bound)
