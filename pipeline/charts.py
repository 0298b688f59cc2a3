"""PNG charts for a run's report, written beside report.md.

- throughput.png: emails completed per second over the run (sent and failed, per-second bins);
- in_flight.png: sends in flight over time against the configured concurrency, so a reader
  sees at a glance whether the pool stayed full;
- latency.png: the distribution of send latencies;
- stages.png: wall time per stage.

Everything is drawn from the run's merged tally (tally.py: per-second counts, started and
finished per 1/20 s, a latency histogram), never from the ledger's rows. matplotlib is
used through its object API with the Agg canvas: no pyplot, no global backend, safe in any
thread. A chart that fails is listed in the report (`chart_errors`), never fails the run.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from . import storage
from .tally import EVENT_STEP, LATENCY_GROWTH, Tally


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


def throughput(rep: dict[str, Any], t: Tally, run_dir: str, t0: float) -> str | None:
    if not t.per_second:
        return None
    first = int(math.floor(t0))
    last = max(t.per_second)
    seconds = np.arange(0, last - first + 1)
    fig, ax = _figure("Emails completed per second")
    edges = np.arange(0, len(seconds) + 1)
    bottom = np.zeros(len(seconds))
    for index, (status, colour) in enumerate((("sent", "tab:green"), ("failed", "tab:red"))):
        counts = np.zeros(len(seconds))
        for s, pair in t.per_second.items():
            if s >= first:
                counts[s - first] += pair[index]
        if counts.any():
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


def in_flight_levels(t: Tally, t0: float) -> tuple[np.ndarray, np.ndarray]:
    """Sends under way at the end of each EVENT_STEP bucket from t0 to the last finish: those
    started by then and not yet finished."""
    lo = min(t.starts)
    hi = max(max(t.ends), max(t.starts))
    starts = np.zeros(hi - lo + 1)
    ends = np.zeros(hi - lo + 1)
    for k, n in t.starts.items():
        starts[k - lo] += n
    for k, n in t.ends.items():
        ends[k - lo] += n
    level = np.cumsum(starts) - np.cumsum(ends)
    times = (np.arange(lo, hi + 1) + 1) * EVENT_STEP - t0
    return times, level


def in_flight(rep: dict[str, Any], t: Tally, run_dir: str, t0: float) -> str | None:
    if not t.starts:
        return None
    times, level = in_flight_levels(t, t0)
    fig, ax = _figure("Sends in flight")
    ax.plot(times, level, color="tab:blue", linewidth=1.2, label="in flight")
    conc = rep.get("config", {}).get("total_concurrency")
    if conc:
        ax.axhline(conc, color="black", linestyle="--", linewidth=1,
                   label=f"configured concurrency {conc:,}")
        ax.set_ylim(0, max(conc, int(level.max())) * 1.1)
    ax.set_xlabel("seconds since the first send")
    ax.set_ylabel("concurrent sends")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    return _save(fig, run_dir, "in_flight.png")


def latency(rep: dict[str, Any], t: Tally, run_dir: str) -> str | None:
    if not t.latency:
        return None
    buckets = np.array(sorted(t.latency))
    counts = np.array([t.latency[int(b)] for b in buckets])
    lower = LATENCY_GROWTH ** buckets.astype(float)
    fig, ax = _figure("Send latency")
    ax.bar(lower, counts, width=lower * (LATENCY_GROWTH - 1), align="edge", color="tab:purple")
    pct = rep.get("latency_s", {})
    for q, style in (("p50", "-"), ("p99", "--")):
        if pct.get(q) is not None:
            ax.axvline(pct[q], color="black", linestyle=style, linewidth=1,
                       label=f"{q} {pct[q]:.3f} s")
    if (counts > 0).any():  # a log axis of nothing but zeros warns (a damaged tally)
        ax.set_yscale("log")
    ax.set_xlabel("seconds per attempt (buckets 1% wide)")
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


def write_charts(rep: dict[str, Any], t: Tally, run_dir: str, *, of_tally: bool = True,
                 of_stages: bool = True) -> tuple[list[str], list[str]]:
    """Draw every chart that the run's data allows, from the report's JSON rendering and the
    merged tally (tally.py): the tally's (throughput, in flight, latency) and the stages';
    returns their file names (relative to `run_dir`) and the failures, which are never
    raised."""
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

    if of_tally and t.starts:
        t0 = min(t.starts) * EVENT_STEP
        attempt("throughput", lambda: throughput(rep, t, run_dir, t0))
        attempt("in_flight", lambda: in_flight(rep, t, run_dir, t0))
        attempt("latency", lambda: latency(rep, t, run_dir))
    if of_stages:
        attempt("stages", lambda: stages(rep, run_dir))
    return written, errors
