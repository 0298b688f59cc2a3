"""Send-stage efficiency of the threaded pool against the ideal, from the ledger's own timestamps.

    python scripts/bench_efficiency.py                 # 100,000 rows, 8 actors x 100 threads, 0.5 s
    python scripts/bench_efficiency.py --rows 20000    # quicker

ideal = rows x latency / (actors x threads)        (62.5 s for the defaults)
efficiency = ideal / (last finished_at - first started_at)   target: at least 0.97
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from pipeline import generate
from pipeline.campaign import run_campaign
from pipeline.config import CampaignConfig, SendConfig


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--actors", type=int, default=8)
    p.add_argument("--threads-per-actor", type=int, default=100)
    p.add_argument("--latency", type=float, default=0.5)
    p.add_argument("--target", type=float, default=0.97)
    a = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bulkmail-bench-"))
    try:
        path = work / "in.parquet"
        generate.generate(a.rows, seed=1).write_parquet(path)
        config = CampaignConfig(
            input=str(path), campaign="bench", runs_dir=str(work / "runs"), dashboard=False,
            charts=False, send=SendConfig(actors=a.actors, threads_per_actor=a.threads_per_actor,
                                          latency=a.latency))
        t0 = time.perf_counter()
        rep = run_campaign(config).to_json()  # type: ignore[union-attr]
        wall = time.perf_counter() - t0
        led = pl.read_parquet(work / "runs/bench/ledger.parquet")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    first = led["started_at"].min().timestamp()  # type: ignore[union-attr]
    last = led["finished_at"].max().timestamp()  # type: ignore[union-attr]
    window = last - first
    ideal = a.rows * a.latency / (a.actors * a.threads_per_actor)
    eff = ideal / window
    print(f"rows {a.rows:,}  actors {a.actors} x threads {a.threads_per_actor}  latency {a.latency} s")
    print(f"sent {led.filter(pl.col('status') == 'sent').height:,}  ledger rows {led.height:,}")
    print(f"send window (ledger: first start -> last end) {window:.2f} s   ideal {ideal:.2f} s")
    ideal_rate = a.actors * a.threads_per_actor / a.latency
    print(f"throughput {a.rows / window:,.0f} emails/s   ideal {ideal_rate:,.0f}/s")
    print("stages (s): " + ", ".join(f"{k} {v}" for k, v in rep["stages_s"].items()))
    print(f"total wall {wall:.1f} s")
    print(f"EFFICIENCY {eff:.4f}  (target >= {a.target})  {'OK' if eff >= a.target else 'BELOW TARGET'}")
    return 0 if eff >= a.target else 1


if __name__ == "__main__":
    sys.exit(main())
