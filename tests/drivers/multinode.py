"""Run a campaign on a simulated multi-node Ray cluster; print one JSON line of facts.

A subprocess of tests/test_multinode.py and scripts/bench_nodes.py: `ray.cluster_utils.Cluster`
cannot share a process with the test session's own `ray.init`.

    python tests/drivers/multinode.py --workdir DIR --rows N --nodes 3 [--remove-at 0.3]
        [--then "--rows 4000 --remove-at 0.3" ...]

The head gets 0 CPUs, as in cluster.yaml, so every sender runs on a worker node; each worker
node gets --cpus logical CPUs. With --remove-at F, the last worker node is killed
(`remove_node(allow_graceful=False)`) once F of the rows are in the send log. Each `--then`
runs one more campaign, with its own flags, on the same cluster once the one before it has
ended (a cluster takes 8-10 s to start here); its facts go in the JSON line's "then" list.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from pipeline import generate  # noqa: E402
from pipeline.campaign import run_campaign  # noqa: E402
from pipeline.config import CampaignConfig, SendConfig  # noqa: E402


def _send_log_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _scrape_sent(ports: list[int], campaign: str) -> dict[str, float]:
    """ray_bulkmail_emails_sent per actor, summed over every node's Prometheus export."""
    out: dict[str, float] = {}
    pattern = re.compile(r'^ray_bulkmail_emails_sent(?:_total)?\{(?P<labels>[^}]*)\} (?P<v>\S+)$')
    for port in ports:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        except OSError:
            continue
        for line in text.decode().splitlines():
            m = pattern.match(line)
            if not m or f'campaign="{campaign}"' not in m["labels"]:
                continue
            actor = re.search(r'actor="([^"]*)"', m["labels"])
            if actor:
                out[actor[1]] = out.get(actor[1], 0.0) + float(m["v"])
    return out


def _campaign_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="--then", add_help=False)
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--actors-per-node", type=int, default=2)
    p.add_argument("--threads", type=int, default=10)
    p.add_argument("--latency", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--remove-at", type=float, default=None)
    p.add_argument("--metrics", action="store_true", help="check the Prometheus export too")
    return p


def _run(a: argparse.Namespace, name: str, work: Path, cluster: Cluster, workers: list[Any],
         ports: list[int], t0: float) -> dict[str, Any]:
    """One campaign on the cluster; removes the last worker node when `a.remove_at` says so."""
    victim = workers[-1]
    work.mkdir(parents=True, exist_ok=True)
    input_path = work / "in.parquet"
    generate.generate(a.rows, seed=1).write_parquet(input_path)
    send_log = work / "send.log"
    config = CampaignConfig(
        input=str(input_path), campaign=name, runs_dir=str(work / "runs"),
        data_dir=str(work / "data"), dashboard=False, charts=False,
        send=SendConfig(actors=a.actors_per_node * len(workers), threads_per_actor=a.threads,
                        latency=a.latency, cpus_per_actor=0.25, send_log=str(send_log),
                        batch_size=a.batch_size))

    removed: dict[str, Any] = {}
    if a.remove_at is not None:
        def remove_when_due() -> None:
            while _send_log_lines(send_log) < a.rows * a.remove_at:
                time.sleep(0.02)
            removed["at_lines"] = _send_log_lines(send_log)
            cluster.remove_node(victim, allow_graceful=False)
            removed["node"] = victim.node_id
            removed["at_s"] = time.perf_counter() - t0
        threading.Thread(target=remove_when_due, daemon=True).start()

    scraped: dict[str, float] = {}
    t_run = time.perf_counter()
    rep = run_campaign(config).to_json()  # type: ignore[union-attr]
    run_s = time.perf_counter() - t_run
    if a.metrics:
        # Ray exports every second here: wait until two scrapes a second apart agree.
        deadline = time.time() + 15
        while time.time() < deadline:
            time.sleep(1.0)
            again = _scrape_sent(ports, name)
            if again and again == scraped:
                break
            scraped = again
    return {"removed": removed, "metrics_sent": scraped, "counts": rep["counts"],
            "send": rep["send"], "run_s": round(run_s, 2),
            "ledger": str(work / "runs" / name / "ledger.parquet"), "send_log": str(send_log)}


def main() -> None:
    p = argparse.ArgumentParser(parents=[_campaign_parser()])
    p.add_argument("--workdir", required=True)
    p.add_argument("--nodes", type=int, default=3, help="worker nodes (the head runs no senders)")
    p.add_argument("--cpus", type=int, default=2, help="logical CPUs per worker node")
    p.add_argument("--then", action="append", default=[], metavar="FLAGS",
                   help="one more campaign's flags (--rows, --remove-at, ...), run after")
    a = p.parse_args()
    thens = [_campaign_parser().parse_args(shlex.split(t)) for t in a.then]
    if any(c.remove_at is not None for c in [a, *thens][:-1]):
        p.error("--remove-at: only the last campaign may remove a node")

    work = Path(a.workdir)
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        # Export metrics every second (default 10 s) so the check below is quick.
        "_system_config": {"metrics_report_interval_ms": 1000},
    })
    workers = [cluster.add_node(num_cpus=a.cpus) for _ in range(a.nodes)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    from ray.data import DataContext
    DataContext.get_current().enable_progress_bars = False
    cluster_s = time.perf_counter() - t0
    ports = [int(n["MetricsExportPort"]) for n in ray.nodes() if n["Alive"]]

    runs = [_run(c, f"multi{i or ''}", work / (f"c{i}" if i else ""), cluster, workers, ports,
                 t0) for i, c in enumerate([a, *thens])]
    print(json.dumps({
        "head": cluster.head_node.node_id, "workers": [w.node_id for w in workers], **runs[0],
        "then": runs[1:], "cluster_s": round(cluster_s, 2),
        "total_s": round(time.perf_counter() - t0, 2),
    }))
    sys.stdout.flush()
    ray.shutdown()
    cluster.shutdown()
    os._exit(0)  # leftover Ray threads of a removed node must not hold the exit


if __name__ == "__main__":
    main()
