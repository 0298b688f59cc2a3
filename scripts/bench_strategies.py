"""Threads, processes, asyncio and bulkmail at the same concurrency: the issue-6 table.

    python scripts/bench_strategies.py            # full: latency 0.5 s, up to 50,000 concurrent
    python scripts/bench_strategies.py --quick    # under a minute: latency 0.05 s, 4 levels

Every strategy sends `waves × concurrency` emails that each wait `latency` seconds, so each is
measured over several full waves:

- threads: `concurrent.futures.ThreadPoolExecutor(max_workers=n)`, one `time.sleep` per email;
- processes: `multiprocessing.Pool(n)` (fork), one `time.sleep` per email; the pool's start-up
  is timed apart and counted in the projection;
- asyncio: n worker coroutines pulling from one iterator, `await asyncio.sleep` per email;
- bulkmail: `run_campaign` with the fake sender at the same total concurrency (actors × threads
  in `--mode threads`, actors × coroutines in `--mode async`), on one Ray started once here.
  Its rate is the ledger's (first start → last finish); its fixed cost (actor start-up, load,
  ledger, report) is counted in the projection.

Efficiency = measured emails/s ÷ ideal (concurrency ÷ latency). Projected 1M = fixed cost +
1,000,000 ÷ emails/s. Writes <out>.md (the table), <out>.png (emails/s against concurrency,
log-log) and <out>.json (every number).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_pipeline import Sampler, busy_cpu_seconds  # noqa: E402

STRATEGIES = ("threads", "processes", "asyncio", "bulkmail threads", "bulkmail async")
MILLION = 1_000_000


@dataclass
class Result:
    strategy: str
    concurrency: int
    emails: int = 0
    seconds: float = 0.0  # the measured window
    startup_s: float = 0.0  # fixed cost outside the window (pool or actor start-up, ...)
    rate: float = 0.0
    efficiency: float = 0.0
    projected_1m_s: float = 0.0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def finish(self, latency: float) -> Result:
        self.rate = self.emails / self.seconds if self.seconds > 0 else 0.0
        ideal = self.concurrency / latency
        self.efficiency = self.rate / ideal if ideal else 0.0
        self.projected_1m_s = self.startup_s + (MILLION / self.rate if self.rate else math.inf)
        return self


# --------------------------------------------------------------------------- plain Python

def run_threads(n: int, emails: int, latency: float) -> Result:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as ex:  # threads start as the first wave is submitted
        futures = [ex.submit(time.sleep, latency) for _ in range(emails)]
        wait(futures)
        seconds = time.perf_counter() - t0
    return Result("threads", n, emails, seconds)


def _noop(_: int) -> None:
    return None


def run_processes(n: int, emails: int, latency: float) -> Result:
    ctx = mp.get_context("fork")
    t0 = time.perf_counter()
    pool = ctx.Pool(n)
    pool.map(_noop, range(n), chunksize=1)  # every worker up and answering
    startup = time.perf_counter() - t0
    me = psutil.Process()
    try:
        uss = sum(c.memory_full_info().uss for c in me.children())
    except psutil.Error:
        uss = 0
    t1 = time.perf_counter()
    pool.map(time.sleep, [latency] * emails, chunksize=1)
    seconds = time.perf_counter() - t1
    pool.terminate()
    pool.join()
    return Result("processes", n, emails, seconds, startup,
                  extra={"uss_bytes": uss, "startup_per_process_s": startup / n})


def run_asyncio(n: int, emails: int, latency: float) -> Result:
    async def main() -> float:
        it = iter(range(emails))

        async def worker() -> None:
            for _ in it:  # one shared iterator: a fixed pool, not a task per email
                await asyncio.sleep(latency)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(n)))
        return time.perf_counter() - t0
    return Result("asyncio", n, emails, asyncio.run(main()))


# --------------------------------------------------------------------------- bulkmail

class Bulkmail:
    """run_campaign on one Ray, started here once (the campaign joins it)."""

    def __init__(self, work: Path, actors: int) -> None:
        import ray
        self.work = work
        self.actors = actors
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                 logging_level=logging.WARNING)
        from ray.data import DataContext
        DataContext.get_current().enable_progress_bars = False
        self.ray_start_s = time.perf_counter() - t0
        self.inputs: dict[int, Path] = {}

    def input(self, rows: int) -> Path:
        from pipeline import generate
        if rows not in self.inputs:
            path = self.work / f"in-{rows}.parquet"
            generate.generate(rows).write_parquet(path)
            self.inputs[rows] = path
        return self.inputs[rows]

    def run(self, mode: str, n: int, emails: int, latency: float) -> Result:
        from pipeline.campaign import run_campaign
        from pipeline.config import CampaignConfig, SendConfig
        # One actor per core; an odd concurrency below 2 × cores goes on one actor.
        actors = self.actors if n % self.actors == 0 else 1
        per_actor = n // actors
        send = SendConfig(actors=actors, mode=mode, threads_per_actor=per_actor,  # type: ignore[arg-type]
                          concurrency_per_actor=per_actor, latency=latency)
        config = CampaignConfig(input=str(self.input(emails)), runs_dir=str(self.work / "runs"),
                                campaign=f"{mode}-{n}", restart=True, dashboard=False,
                                charts=False, send=send)
        rep = run_campaign(config).to_json()  # type: ignore[union-attr]
        s = rep["send"]
        assert rep["counts"]["sent"] == emails, rep["counts"]
        shutil.rmtree(self.work / "runs" / f"{mode}-{n}", ignore_errors=True)
        return Result(f"bulkmail {mode}", n, emails, s["window_s"],
                      startup_s=rep["total_s"] - s["window_s"],
                      note=f"{actors} × {per_actor:,}",
                      extra={"stages_s": rep["stages_s"], "total_s": rep["total_s"]})


# --------------------------------------------------------------------------- output

def fmt_rate(r: Result) -> str:
    if not r.rate:
        return r.note or "–"
    return f"{r.rate:,.0f} ({r.efficiency:.0%})"


def fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "–"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def markdown(results: list[Result], args: argparse.Namespace, levels: list[int],
             notes: list[str], elapsed: float) -> str:
    by = {(r.strategy, r.concurrency): r for r in results}
    head = "| concurrency | ideal/s | " + " | ".join(STRATEGIES) + " |"
    sep = "|---:|---:|" + "---:|" * len(STRATEGIES)
    lines = [f"Emails/s (efficiency vs ideal = concurrency ÷ {args.latency} s latency); "
             f"{os.cpu_count()} cores; `python scripts/bench_strategies.py"
             f"{' --quick' if args.quick else ''}` in {elapsed / 60:.1f} min "
             # Not the load average: 10,000 threads waiting for the GIL push it past 1,000.
             "(how busy the rest of the machine was: last note).", "", head, sep]
    for n in levels:
        cells = [fmt_rate(by[(s, n)]) if (s, n) in by else "–" for s in STRATEGIES]
        lines.append(f"| {n:,} | {n / args.latency:,.0f} | " + " | ".join(cells) + " |")
    lines += ["", "Projected time for 1,000,000 emails (fixed start-up cost + 1M ÷ emails/s):", "",
              head, sep]
    for n in levels:
        cells = [fmt_time(by[(s, n)].projected_1m_s) if (s, n) in by and by[(s, n)].rate else "–"
                 for s in STRATEGIES]
        lines.append(f"| {n:,} | {fmt_time(MILLION * args.latency / n)} | " + " | ".join(cells) + " |")
    lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def chart(results: list[Result], args: argparse.Namespace, levels: list[int], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = sorted(levels)
    ax.plot(xs, [x / args.latency for x in xs], color="grey", linestyle=":", label="ideal")
    styles = {"threads": "o-", "processes": "s-", "asyncio": "^-", "bulkmail threads": "D--",
              "bulkmail async": "*-"}
    for s in STRATEGIES:
        pts = sorted((r.concurrency, r.rate) for r in results if r.strategy == s and r.rate)
        if pts:
            ax.plot(*zip(*pts, strict=True), styles[s], label=s, markersize=6 if s != "bulkmail async" else 9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent sends")
    ax.set_ylabel("emails / s")
    ax.set_title(f"Emails/s against concurrency ({args.latency} s per email, "
                 f"{os.cpu_count()} cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path)


# --------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="under a minute: latency 0.05 s, 4 levels")
    ap.add_argument("--latency", type=float, default=None, help="seconds per email (0.5; quick 0.05)")
    ap.add_argument("--out", default=None,
                    help="output prefix (docs/strategies; quick: a temporary directory)")
    ap.add_argument("--process-cap", type=int, default=None,
                    help="largest process pool to start (1,000; quick 100)")
    ap.add_argument("--actors", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()
    a.latency = a.latency if a.latency is not None else (0.05 if a.quick else 0.5)
    cap = a.process_cap or (100 if a.quick else 1000)
    if a.quick:
        levels = [1, 10, 100, 1000]
        waves: Callable[[int], int] = lambda n: 3  # noqa: E731
        async_only = [10_000]
    else:
        levels = [1, 2, 5, 10, 50, 100, 500, 1000, 5000, 10_000]
        # Fewer waves above 1,000: 10,000 threads manage a few hundred emails/s here, so six
        # waves of them took three minutes of a ten-minute budget.
        waves = lambda n: 8 if n <= 100 else 6 if n <= 1000 else 3  # noqa: E731
        async_only = [50_000]
    out = Path(a.out) if a.out else (Path(tempfile.mkdtemp()) / "strategies" if a.quick
                                     else ROOT / "docs" / "strategies")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    machine0 = busy_cpu_seconds()
    tree = Sampler(os.getpid(), every=1.0)  # this process and its children (pools, Ray)
    tree.start()
    results: list[Result] = []
    notes: list[str] = []

    def record(r: Result) -> None:
        r.finish(a.latency)
        results.append(r)
        print(f"{r.strategy:>16} {r.concurrency:>7,}: {r.emails:>8,} emails in {r.seconds:6.2f} s  "
              f"{r.rate:>9,.0f}/s  {r.efficiency:5.0%}  start-up {r.startup_s:5.2f} s  "
              f"1M in {fmt_time(r.projected_1m_s)}", flush=True)

    # Plain strategies first: the process pool forks, and must not fork a process running Ray.
    biggest_pool: Result | None = None
    for n in levels + async_only:
        emails = waves(n) * n
        if n not in async_only:
            record(run_threads(n, emails, a.latency))
            if n <= cap:
                biggest_pool = run_processes(n, emails, a.latency)
                record(biggest_pool)
            elif biggest_pool is not None:
                per = biggest_pool.extra["uss_bytes"] / biggest_pool.concurrency
                up = biggest_pool.extra["startup_per_process_s"]
                results.append(Result("processes", n, note=(
                    f"not run: ~{per * n / 2**30:,.0f} GiB, ~{up * n:,.0f} s start-up")))
        record(run_asyncio(n, emails, a.latency))
    if biggest_pool is not None:
        per = biggest_pool.extra["uss_bytes"] / biggest_pool.concurrency
        notes.append(f"processes: pools above {cap:,} not started. Measured at "
                     f"{biggest_pool.concurrency:,}: {per / 2**20:.1f} MiB private memory (USS) "
                     f"and {biggest_pool.extra['startup_per_process_s'] * 1000:.1f} ms start-up per "
                     "process; the table's estimates scale those "
                     f"({psutil.virtual_memory().total / 2**30:.0f} GiB of RAM here).")
    notes.append(f"Each strategy sends {waves(1)} waves of `concurrency` emails up to 100 concurrent, "
                 f"{waves(1000)} up to 1,000, {waves(10_000)} above; threads' start-up is inside "
                 "their window.")

    work = Path(tempfile.mkdtemp(prefix="bulkmail-strategies-"))
    try:
        bm = Bulkmail(work, a.actors)
        notes.append(f"bulkmail: Ray started once in {bm.ray_start_s:.1f} s (not in the table); "
                     f"{a.actors} actors when the concurrency divides by {a.actors}, else 1. Emails/s "
                     "from the ledger (first start → last finish); projection adds the run's fixed "
                     "cost (actor start-up, load, ledger, report).")
        for n in levels + async_only:
            emails = waves(n) * n
            if a.quick and n not in (100, 1000, 10_000):
                continue  # each run starts its actors (a few seconds): three runs fit a minute
            if n not in async_only and (not a.quick or n == 100):
                record(bm.run("threads", n, emails, a.latency))
            if not a.quick or n != 100:
                record(bm.run("async", n, emails, a.latency))
    finally:
        import ray
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    levels_all = levels + async_only
    elapsed = time.perf_counter() - started
    tree.stop()
    others = max(0.0, busy_cpu_seconds() - machine0 - sum(tree.cpu_by_group().values()))
    notes.append(f"Other processes used {others:,.0f} s of CPU during this run "
                 f"({others / (elapsed * (os.cpu_count() or 1)):.0%} of the machine).")
    md = markdown(results, a, levels_all, notes, elapsed)
    out.with_suffix(".md").write_text(md)
    chart(results, a, levels_all, out.with_suffix(".png"))
    out.with_suffix(".json").write_text(json.dumps(
        {"latency_s": a.latency, "cores": os.cpu_count(), "quick": a.quick,
         "elapsed_s": round(elapsed, 1), "results": [asdict(r) for r in results]}, indent=1,
        default=str))
    print()
    print(md)
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.png')}, {out.with_suffix('.json')} "
          f"in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
