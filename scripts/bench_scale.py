"""How the driver's memory grows with the list: flat, since the load, the fold and the report run
as Ray tasks (issue 14).

    python scripts/bench_scale.py                         # 5M and 20M recipients
    python scripts/bench_scale.py --rows 1000000 5000000  # other sizes
    python scripts/bench_scale.py --json docs/scale.json
    python scripts/bench_scale.py --one-wave-too          # and each size with --wave-rows 0

For each size it generates (once, cached under --work-dir) a list with 2% invalid and 2%
duplicate addresses and a suppression list of 1% of the addresses, then runs the real CLI in a
subprocess: `--mode async --latency 0` (no waiting: the pipeline's own cost), with the
suppression list, from a fresh campaign. A sampler (scripts/bench_pipeline.py's) walks the
process tree every 0.2 s and keeps the driver's own peak RSS, each group's and the whole tree's
(RSS counts Ray's shared object-store pages in every process that maps them: an upper bound).
Prints per size: the driver's peak, the tree's peak, the wall time of every stage, and the time
to the first email; then the driver's peak at the largest size over the smallest (flat: ~1).
Target (2 cores): the driver's peak at most 1.5 GiB at every size. With --one-wave-too, each
size runs again in one wave (`--wave-rows 0`: the whole list settles before the first email)
and the bench prints the first email's time in waves over that baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import Sampler, send_window  # noqa: E402

DRIVER_TARGET = 1.5 * 2**30


def ensure_inputs(work: Path, rows: int) -> tuple[Path, Path]:
    inp = work / f"dirty-{rows}.parquet"
    unsub = work / f"unsub-{rows}.txt"
    if inp.exists() and unsub.exists():
        return inp, unsub
    from pipeline import generate
    work.mkdir(parents=True, exist_ok=True)
    print(f"generating {rows:,} recipients into {inp}", flush=True)
    frame = generate.generate(rows, seed=14, invalid_fraction=0.02, duplicate_fraction=0.02)
    frame.write_parquet(inp, row_group_size=250_000)
    emails = frame["email"].drop_nulls()
    unsub.write_text("\n".join(emails.gather_every(100, offset=7).to_list()) + "\n")
    return inp, unsub


def run(work: Path, rows: int, actors: int, concurrency: int, extra: list[str]) -> dict[str, object]:
    inp, unsub = ensure_inputs(work, rows)
    runs = work / "runs"
    shutil.rmtree(runs / "scale", ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline.run", "--input", str(inp), "--suppress", str(unsub),
           "--campaign", "scale", "--runs-dir", str(runs), "--no-dashboard", "--no-metrics",
           "--mode", "async", "--actors", str(actors), "--concurrency-per-actor", str(concurrency),
           "--latency", "0", "--progress-every", "10", *extra]
    print("$ " + " ".join(cmd[1:]).replace(sys.executable, "python"), flush=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0, t0_epoch = time.perf_counter(), time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[") and "emails/s" in line:
            print("  " + line.rstrip(), flush=True)
    rc = proc.wait()
    wall = time.perf_counter() - t0
    sampler.stop()
    report = runs / "scale" / "report.json"
    if rc != 0 or not report.exists():
        sys.stdout.write("".join(lines[-30:]))
        raise SystemExit(f"run failed with exit code {rc}")
    rep = json.loads(report.read_text())
    first, _ = send_window(runs / "scale")
    return {
        "rows": rows, "command": " ".join(cmd[1:]).replace(sys.executable, "python"),
        "exit": rc, "process_wall_s": round(wall, 1), "stages_s": rep["stages_s"],
        "counts": rep["counts"], "send_window_emails_per_s": rep["send"]["emails_per_s"],
        "first_email_after_s": round(first - t0_epoch, 1),
        "driver_peak_rss": sampler.peak_rss.get("driver", 0),
        "peak_rss_by_group": sampler.peak_rss, "tree_peak_rss": sampler.peak_total,
        "processes": sampler.peak_procs,
    }


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[5_000_000, 20_000_000])
    ap.add_argument("--actors", type=int, default=2)
    # Batches are a quarter of the pool (batching.batch_size_for) and the driver holds ~50 KB
    # per block of one batch: 2 × 5,000 made 16,000 blocks of 1,250 at 20M (driver 1.06 GiB,
    # 59,000/s); 2 × 50,000 makes blocks of 12,500, as the 1M run uses.
    ap.add_argument("--concurrency-per-actor", type=int, default=50_000)
    ap.add_argument("--work-dir", default="/tmp/bulkmail-scale")
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--one-wave-too", action="store_true",
                    help="also run each size with --wave-rows 0, the baseline for the first email")
    ap.add_argument("extra", nargs="*", help="more CLI flags after --")
    a = ap.parse_args()
    work = Path(a.work_dir)
    results, baselines = [], []
    for n in a.rows:
        results.append(run(work, n, a.actors, a.concurrency_per_actor, a.extra))
        if a.one_wave_too:
            baselines.append(run(work, n, a.actors, a.concurrency_per_actor,
                                 [*a.extra, "--wave-rows", "0"]))
    print()
    print(f"{'rows':>12}  {'driver peak':>11}  {'tree peak':>10}  {'first email':>11}  "
          f"{'wall':>7}  stages (s)")
    for r in results:
        stages = " · ".join(f"{k} {v:.1f}" for k, v in r["stages_s"].items())  # type: ignore[attr-defined]
        print(f"{r['rows']:>12,}  {gib(r['driver_peak_rss']):>11}  "  # type: ignore[arg-type]
              f"{gib(r['tree_peak_rss']):>10}  {r['first_email_after_s']:>10} s  "  # type: ignore[arg-type]
              f"{r['process_wall_s']:>6} s  {stages}")
    peaks = [float(r["driver_peak_rss"]) for r in results]  # type: ignore[arg-type]
    ratio = peaks[-1] / peaks[0] if peaks[0] else float("nan")
    ok = all(p <= DRIVER_TARGET for p in peaks)
    print(f"driver peak at {a.rows[-1]:,} / at {a.rows[0]:,}: {ratio:.2f} "
          f"(rows ×{a.rows[-1] / a.rows[0]:.0f}); every driver peak ≤ 1.5 GiB: "
          f"{'OK' if ok else 'NOT MET'}")
    for r, b in zip(results, baselines, strict=False):
        print(f"{r['rows']:>12,}  first email in waves {r['first_email_after_s']} s, in one wave "
              f"{b['first_email_after_s']} s: "
              f"{float(r['first_email_after_s']) / float(b['first_email_after_s']):.2f}; "  # type: ignore[arg-type]
              f"wall {r['process_wall_s']} s against {b['process_wall_s']} s; driver peak "
              f"{gib(r['driver_peak_rss'])} against {gib(b['driver_peak_rss'])}")  # type: ignore[arg-type]
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": {"cores": os.cpu_count()},
                                            "runs": results, "one_wave": baselines},
                                           indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
