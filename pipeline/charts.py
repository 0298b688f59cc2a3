"""PNG charts for a run's report, written beside report.md.

- throughput.png: emails completed per second over the run (sent and failed, per-second bins);
- in_flight.png: sends in flight over time against the configured concurrency, so a reader
  sees at a glance whether the pool stayed full;
- latency.png: the distribution of send latencies;
- stages.png: wall time per stage.

Everything is aggregated in polars first (per-second counts, a histogram, in-flight counts at
a few hundred instants), so a 1M-row ledger is drawn in well under a second. matplotlib is
used through its object API with the Agg canvas: no pyplot, no global backend, safe in any
thread. A chart that fails is listed in the report (`chart_errors`), never fails the run.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from . import storage

# Samples across the send window for the in-flight curve: enough to show a dip at batch
# boundaries (a few hundred ms at 0.5 s latency) on a run of minutes.
IN_FLIGHT_SAMPLES = 600
LATENCY_BINS = 60


def _figure(title: str) -> Any:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Any, run_dir: str, name: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    storage.write_bytes(storage.join(run_dir, name), buf.getvalue())
    return name


def attempt_windows(rows: pl.DataFrame) -> pl.DataFrame:
    """(start, end) epoch seconds of each recorded send. The ledger keeps the first start and
    the last finish of a recipient; for a retried one the last attempt is
    (finished_at - latency_s, finished_at), and the backoff before it held no slot."""
    tried = rows.filter(pl.col("finished_at").is_not_null() & pl.col("started_at").is_not_null())
    end = pl.col("finished_at").dt.epoch("us").cast(pl.Float64) / 1e6
    start = pl.when((pl.col("attempts") > 1) & pl.col("latency_s").is_not_null()) \
        .then(end - pl.col("latency_s")) \
        .otherwise(pl.col("started_at").dt.epoch("us").cast(pl.Float64) / 1e6)
    return tried.select(start.alias("start"), end.alias("end"), pl.col("status"))


def throughput(rep: dict[str, Any], windows: pl.DataFrame, run_dir: str, t0: float) -> str | None:
    if windows.height == 0:
        return None
    per_s = (windows.with_columns(((pl.col("end") - t0).floor()).cast(pl.Int64).alias("s"))
             .group_by("s", "status").len()
             .pivot(on="status", index="s", values="len").fill_null(0).sort("s"))
    seconds = np.arange(0, int(per_s["s"].to_numpy().max()) + 1)
    fig, ax = _figure("Emails completed per second")
    edges = np.arange(0, len(seconds) + 1)
    bottom = np.zeros(len(seconds))
    for status, colour in (("sent", "tab:green"), ("failed", "tab:red")):
        if status in per_s.columns:
            counts = np.zeros(len(seconds))
            counts[per_s["s"].to_numpy()] = per_s[status].to_numpy()
            # stairs, not bar: one artist however long the run (bar draws one per second).
            ax.stairs(bottom + counts, edges, baseline=bottom.copy(), fill=True, color=colour,
                      label=status)
            bottom += counts
    cfg = rep.get("config", {})
    top = float(bottom.max()) if len(bottom) else 1.0
    if cfg.get("latency_s") and cfg.get("total_concurrency"):
        ideal = cfg["total_concurrency"] / cfg["latency_s"]
        ax.axhline(ideal, color="black", linestyle="--", linewidth=1,
                   label=f"ideal {ideal:,.0f}/s (concurrency ÷ latency)")
        top = max(top, ideal)
    ax.set_xlabel("seconds since the first send")
    ax.set_ylabel("emails / s")
    ax.set_ylim(0, top * 1.15)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    return _save(fig, run_dir, "throughput.png")


def in_flight_levels(windows: pl.DataFrame, t0: float,
                     samples: int = IN_FLIGHT_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """Sends under way at `samples` instants from t0 to the last finish: those started at or
    before the instant and not yet finished."""
    starts = np.sort(windows["start"].to_numpy()) - t0
    ends = np.sort(windows["end"].to_numpy()) - t0
    t = np.linspace(0.0, float(ends[-1]), samples)
    level = np.searchsorted(starts, t, side="right") - np.searchsorted(ends, t, side="right")
    return t, level


def in_flight(rep: dict[str, Any], windows: pl.DataFrame, run_dir: str, t0: float) -> str | None:
    if windows.height == 0:
        return None
    t, level = in_flight_levels(windows, t0)
    fig, ax = _figure("Sends in flight")
    ax.plot(t, level, color="tab:blue", linewidth=1.2, label="in flight")
    conc = rep.get("config", {}).get("total_concurrency")
    if conc:
        ax.axhline(conc, color="black", linestyle="--", linewidth=1,
                   label=f"configured concurrency {conc:,}")
        ax.set_ylim(0, max(conc, int(level.max())) * 1.1)
    ax.set_xlabel("seconds since the first send")
    ax.set_ylabel("concurrent sends")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    return _save(fig, run_dir, "in_flight.png")


def latency(rep: dict[str, Any], rows: pl.DataFrame, run_dir: str) -> str | None:
    lat = rows.get_column("latency_s").drop_nulls()
    if lat.len() == 0:
        return None
    lo, hi = float(lat.min()), float(lat.max())  # type: ignore[arg-type]
    if hi <= lo:
        hi = lo + 1e-3
    hist = lat.hist(bins=list(np.linspace(lo, hi, LATENCY_BINS + 1)), include_breakpoint=True)
    edges = np.concatenate([[lo], hist["breakpoint"].to_numpy()])
    counts = hist["count"].to_numpy()
    fig, ax = _figure("Send latency")
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:purple")
    pct = rep.get("latency_s", {})
    for q, style in (("p50", "-"), ("p99", "--")):
        if pct.get(q) is not None:
            ax.axvline(pct[q], color="black", linestyle=style, linewidth=1,
                       label=f"{q} {pct[q]:.3f} s")
    ax.set_yscale("log")
    ax.set_xlabel("seconds per attempt")
    ax.set_ylabel("emails")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    return _save(fig, run_dir, "latency.png")


def stages(rep: dict[str, Any], run_dir: str) -> str | None:
    st = {k: float(v) for k, v in rep.get("stages_s", {}).items() if v is not None}
    if not st:
        return None
    fig, ax = _figure("Time per stage")
    names = list(st)[::-1]
    values = [st[n] for n in names]
    bars = ax.barh(names, values, color="tab:orange")
    ax.bar_label(bars, labels=[f"{v:.2f} s" for v in values], fontsize=8, padding=3)
    ax.set_xlabel("seconds (wall)")
    ax.set_xlim(0, max(values) * 1.2 if max(values) > 0 else 1)
    return _save(fig, run_dir, "stages.png")


def write_charts(rep: dict[str, Any], this_run: pl.DataFrame,
                 run_dir: str) -> tuple[list[str], list[str]]:
    """Draw every chart that the run's data allows, from the report's JSON rendering; returns
    their file names (relative to `run_dir`) and the failures, which are never raised."""
    written: list[str] = []
    errors: list[str] = []

    def attempt(name: str, draw: Callable[[], str | None]) -> None:
        try:
            out = draw()
        except Exception as exc:  # noqa: BLE001 - a chart is never worth failing a run
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
        else:
            if out:
                written.append(out)

    try:
        # One row per recipient and run attempt as recorded (repeats included: they were sent).
        windows = attempt_windows(this_run)
        t0 = float(windows["start"].min()) if windows.height else 0.0  # type: ignore[arg-type]
        rows = this_run.filter(pl.col("started_at").is_not_null())
    except Exception as exc:  # noqa: BLE001
        errors.append(f"ledger: {type(exc).__name__}: {exc}")
        windows, t0, rows = pl.DataFrame(), 0.0, pl.DataFrame()
    if windows.height:
        attempt("throughput", lambda: throughput(rep, windows, run_dir, t0))
        attempt("in_flight", lambda: in_flight(rep, windows, run_dir, t0))
        attempt("latency", lambda: latency(rep, rows, run_dir))
    attempt("stages", lambda: stages(rep, run_dir))
    return written, errors
