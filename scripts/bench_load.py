"""The driver's load stage at 1M and 10M recipients: wall time and peak memory.

    python scripts/bench_load.py                      # 1M and 10M
    python scripts/bench_load.py --rows 1000000 --invalid-fraction 0.01 --duplicate-fraction 0.01

Each size runs in a fresh process through the real code path (`run_campaign` with --dry-run 1:
plan, resume anti-join, validation, dedup, suppression, settling; it stops before Ray), and
reports the report's own "load" stage time and the process's peak RSS (VmHWM), next to
the RSS of an idle process that imported the same modules. Inputs are generated once under
data/bench/ (10M rows take about 15 s and 0.4 GB on disk).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    """Peak RSS of this process image: VmHWM (ru_maxrss would also count a parent's peak from
    before the fork, e.g. the generator's 10M-row frame)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(path: str, runs: str) -> None:
    from pipeline.campaign import run_campaign
    from pipeline.config import CampaignConfig, SendConfig
    baseline = _rss_mb()
    t0 = time.perf_counter()
    rep = run_campaign(CampaignConfig(input=path, campaign="bench-load", runs_dir=runs,
                                      dry_run=1, dashboard=False, charts=False,
                                      send=SendConfig())).to_json()
    wall = time.perf_counter() - t0
    print(json.dumps({"load_s": rep["stages_s"]["load"], "wall_s": round(wall, 2),
                      "baseline_rss_mb": round(baseline), "peak_rss_mb": round(_rss_mb()),
                      "counts": rep["counts"]}))


def ensure_input(rows: int, invalid: float, duplicate: float) -> tuple[Path, float]:
    from pipeline import generate
    path = ROOT / "data" / "bench" / f"recipients-{rows}-{invalid}-{duplicate}.parquet"
    if path.exists():
        return path, 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    frame = generate.generate(rows, seed=0, invalid_fraction=invalid, duplicate_fraction=duplicate)
    tmp = path.with_suffix(".tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, path)
    return path, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--invalid-fraction", type=float, default=0.001)
    p.add_argument("--duplicate-fraction", type=float, default=0.001)
    p.add_argument("--child", nargs=2, metavar=("INPUT", "RUNS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(*a.child)
        return
    print(f"{'rows':>12} {'file MB':>8} {'generate s':>10} {'load s':>7} {'peak RSS MB':>11} "
          f"{'idle RSS MB':>11} {'bytes/row':>9}")
    for rows in a.rows:
        path, gen_s = ensure_input(rows, a.invalid_fraction, a.duplicate_fraction)
        with tempfile.TemporaryDirectory() as runs:
            out = subprocess.run([sys.executable, __file__, "--child", str(path), runs],
                                 capture_output=True, text=True, check=True, cwd=ROOT)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        per_row = (r["peak_rss_mb"] - r["baseline_rss_mb"]) * 2**20 / rows
        print(f"{rows:>12,} {path.stat().st_size / 2**20:>8.0f} {gen_s:>10.1f} {r['load_s']:>7.2f} "
              f"{r['peak_rss_mb']:>11,} {r['baseline_rss_mb']:>11,} {per_row:>9.0f}")
        c = r["counts"]
        print(f"{'':>12} invalid {c.get('invalid', 0):,}, duplicate {c.get('duplicate', 0):,}, "
              f"of {c['input_rows']:,}")


if __name__ == "__main__":
    main()
