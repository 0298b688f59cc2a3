"""Throughput with 1, 2 and 3 simulated sender nodes at a fixed concurrency per node.

    python scripts/bench_nodes.py                     # 1, 2, 3 nodes
    python scripts/bench_nodes.py --nodes 1 2 3 4 --rows-per-node 3000 --latency 0.2

Each point is a fresh `ray.cluster_utils.Cluster` (a head with 0 CPUs, as in cluster.yaml, and N
sender nodes of 2 logical CPUs) running tests/drivers/multinode.py in its own process, with
the work scaled with the nodes (rows-per-node × N) so every point sends for about as long.
Throughput is the report's: rows / (last finish − first start) from the ledger. The ratio to
linear is throughput(N) / (N × throughput(1)). All simulated nodes share this machine's cores:
the ratio falls once the senders' CPU, not the latency, is the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "drivers" / "multinode.py"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--rows-per-node", type=int, default=3000)
    p.add_argument("--actors-per-node", type=int, default=2)
    p.add_argument("--threads", type=int, default=50, help="threads per actor")
    p.add_argument("--latency", type=float, default=0.2)
    a = p.parse_args()
    per_node_ideal = a.actors_per_node * a.threads / a.latency
    print(f"per node: {a.actors_per_node} actors × {a.threads} threads, latency {a.latency} s "
          f"→ ideal {per_node_ideal:,.0f} emails/s")
    print(f"{'nodes':>5} {'rows':>7} {'window s':>8} {'emails/s':>9} {'vs ideal':>8} "
          f"{'ratio to linear':>15} {'cluster start s':>15}")
    base: float | None = None
    for n in a.nodes:
        rows = a.rows_per_node * n
        with tempfile.TemporaryDirectory() as work:
            out = subprocess.run(
                [sys.executable, str(DRIVER), "--workdir", work, "--rows", str(rows),
                 "--nodes", str(n), "--actors-per-node", str(a.actors_per_node),
                 "--threads", str(a.threads), "--latency", str(a.latency)],
                capture_output=True, text=True, cwd=ROOT, timeout=600)
        if out.returncode != 0:
            sys.exit(f"{n} nodes failed:\n{out.stderr[-2000:]}")
        facts = json.loads(out.stdout.strip().splitlines()[-1])
        rate = float(facts["send"]["emails_per_s"])
        base = base if base is not None else rate / n
        print(f"{n:>5} {rows:>7,} {facts['send']['window_s']:>8.2f} {rate:>9,.0f} "
              f"{rate / (n * per_node_ideal):>8.2f} {rate / (n * base):>15.2f} "
              f"{facts['cluster_s']:>15.1f}", flush=True)


if __name__ == "__main__":
    main()
