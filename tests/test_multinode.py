"""A simulated multi-node cluster (`ray.cluster_utils.Cluster`): a head that runs no senders, as
in cluster.yaml, and three sender nodes of 2 logical CPUs each. tests/drivers/multinode.py runs
in a process of its own (a Cluster cannot share a process with the test session's `ray.init`),
once for this module: two campaigns in turn on one cluster, the second losing a node (one
cluster instead of two saves its 8-10 s start and stop).
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


SPREAD_ROWS = 3000
# The node-loss campaign. Batches of 1 s of an actor's sending (100 at 10 threads / 0.1 s), so
# a lost actor dies with results recorded but not yet flushed, the case the bound is about.
ROWS, THREADS, LATENCY, FLUSH_S = 4000, 10, 0.1, 0.5


@pytest.fixture(scope="module")
def campaigns(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    """The facts of both campaigns: spread (with metrics), then node loss."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    then = (f"--rows {ROWS} --threads {THREADS} --latency {LATENCY} --batch-size 100 "
            "--remove-at 0.3")
    proc = subprocess.run([sys.executable, str(DRIVER), "--workdir",
                           str(tmp_path_factory.mktemp("multinode")), "--nodes", "3",
                           "--rows", str(SPREAD_ROWS), "--metrics", f"--then={then}"],
                          capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    (loss,) = facts["then"]
    return facts, {**loss, "workers": facts["workers"]}


def _sends(send_log: str) -> collections.Counter[int]:
    return collections.Counter(int(line) for line in Path(send_log).read_text().split())


def test_sends_spread_over_every_sender_node_and_none_on_the_head(
        campaigns: tuple[dict[str, Any], dict[str, Any]]) -> None:
    rows, facts = SPREAD_ROWS, campaigns[0]
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
        campaigns: tuple[dict[str, Any], dict[str, Any]]) -> None:
    rows, threads, latency, flush_s = ROWS, THREADS, LATENCY, FLUSH_S
    facts = campaigns[1]
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
