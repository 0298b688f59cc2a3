"""Charts beside report.md: produced, real PNGs, drawn from the run's tally (the mergeable
aggregates of its ledger rows), never failing a run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import charts, ledger, tally
from pipeline.campaign import run_campaign

from .conftest import campaign, write_recipients

PNG = b"\x89PNG\r\n\x1a\n"
NAMES = ["throughput.png", "in_flight.png", "latency.png", "stages.png"]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG, path
    assert len(data) > 2000, path  # a drawn chart, not an empty canvas


def journal(tmp_path: Path, rows: list[tuple[int, str, int, float, float, float]]) -> tally.Tally:
    """The tally of a real ledger journal written by LedgerWriter: (id, status, attempts, start,
    end, latency), summed over two halves as two partitions would be."""
    w = ledger.LedgerWriter(str(tmp_path), writer="a", node="n", run="r", flush_seconds=0)
    for rid, status, attempts, start, end, lat in rows:
        w.record(rid, f"u{rid}@example.com", status, attempts, None if status == "sent" else "421",
                 start, end, lat, f"<c.{rid}@x>")
    w.close()
    rows_ = ledger.read_journal(str(tmp_path))
    half = rows_.height // 2
    return tally.merge([tally.summarise(rows_.head(half), run_id="r"),
                        tally.summarise(rows_.tail(rows_.height - half), run_id="r")])


def report(concurrency: int = 4, latency: float = 0.5) -> dict[str, object]:
    return {"config": {"total_concurrency": concurrency, "latency_s": latency},
            "latency_s": {"p50": 0.5, "p99": 0.6},
            "stages_s": {"load": 0.2, "ray_start": 3.0, "send": 5.0, "ledger": 0.3}}


def test_every_chart_written_as_png(tmp_path: Path) -> None:
    t0 = time.time()
    rows = [(i, "sent" if i % 5 else "failed", 1 + (i % 3 == 0), t0 + i * 0.01,
             t0 + i * 0.01 + 0.5, 0.5) for i in range(400)]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rep = report()
    names, _ = charts.write_charts(rep, journal(tmp_path / "j", rows), str(run_dir))
    assert names == NAMES
    for n in names:
        assert_png(run_dir / n)
    assert "chart_errors" not in rep


def test_the_tally_charts_and_the_stages_chart_drawn_apart_list_each_once(tmp_path: Path) -> None:
    """As a run draws them: the tally's while Ray stops, the stages' once it has stopped."""
    from pipeline import report as report_module
    t0 = time.time()
    totals = journal(tmp_path / "j", [(i, "sent", 1, t0 + i * 0.01, t0 + i * 0.01 + 0.2, 0.2)
                                      for i in range(50)])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    names, _ = charts.write_charts(report(), totals, str(run_dir), of_stages=False)
    assert names == NAMES[:3] and not (run_dir / "stages.png").exists()
    names, _ = charts.write_charts(report(), totals, str(tmp_path), of_tally=False)
    assert names == ["stages.png"]
    rep = _report_of(totals, str(run_dir))
    rep = report_module.with_charts(rep, totals, of_stages=False)
    rep = report_module.with_charts(rep, totals, of_tally=False)
    assert list(rep.charts) == NAMES and not rep.chart_errors
    for n in NAMES:
        assert_png(run_dir / n)


def _report_of(totals: tally.Tally, run_dir: str) -> Any:
    from pipeline import report as report_module
    from pipeline.config import SendConfig
    from pipeline.partitions import LoadSummary
    return report_module.build(
        campaign="c", run_id="r", run_dir=run_dir, input="in.parquet", send=SendConfig(),
        batch_size=1, loaded=LoadSummary(input_rows=50, to_send=50, already_done=0),
        tally=totals, stages={"send": 1.0, "ray_stop": 0.5}, ray_stats=(), crashed_batches=0,
        started_at=time.time(), interrupted=False)


def test_in_flight_counts_overlapping_sends_and_only_the_last_attempt(tmp_path: Path) -> None:
    t0 = 1_000_000.0
    totals = journal(tmp_path, [
        (1, "sent", 1, t0, t0 + 1.0, 1.0),
        (2, "sent", 1, t0 + 0.5, t0 + 1.5, 1.0),
        # Retried: first started at t0, last attempt took 0.2 s and ended at t0 + 3. The backoff
        # in between held no slot, so it is in flight only from t0 + 2.8.
        (3, "sent", 2, t0, t0 + 3.0, 0.2),
    ])
    t, level = charts.in_flight_levels(totals, t0)  # at the end of every 0.05 s
    at = {round(float(x), 2): int(v) for x, v in zip(t, level, strict=True)}
    assert at[0.25] == 1 and at[0.75] == 2 and at[1.25] == 1
    assert at[2.0] == 0 and at[2.9] == 1
    assert int(level.max()) == 2


def test_a_broken_chart_is_reported_and_the_others_still_written(tmp_path: Path) -> None:
    t0 = time.time()
    frame = journal(tmp_path / "j", [(i, "sent", 1, t0, t0 + 0.1, 0.1) for i in range(10)])
    rep = report()
    rep["stages_s"] = {"load": "not a number"}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    names, errors = charts.write_charts(rep, frame, str(run_dir))
    assert names == NAMES[:3]
    assert any(e.startswith("stages:") for e in errors)


def test_unwritable_run_dir_and_bad_tally_never_raise(tmp_path: Path) -> None:
    bad = tally.Tally(starts={1: 1}, ends={"x": 1}, per_second={2: (1,)},  # type: ignore[dict-item]
                      latency={3: "many"})  # type: ignore[dict-item]
    names, errors = charts.write_charts(report(), bad, str(tmp_path / "missing"))
    assert names == []
    assert len(errors) >= 2


def test_no_sends_gives_only_the_stage_chart(tmp_path: Path) -> None:
    empty = tally.summarise(pl.DataFrame(schema=ledger.POLARS_SCHEMA), run_id="r")
    names, _ = charts.write_charts(report(), empty, str(tmp_path))
    assert names == ["stages.png"]


def test_latency_percentiles_from_merged_histograms_are_within_one_percent(tmp_path: Path) -> None:
    import random
    rnd = random.Random(4)
    lat = [rnd.lognormvariate(-2, 0.7) for _ in range(3000)]
    rows = [(i, "sent", 1, 100.0 + i, 100.0 + i + v, v) for i, v in enumerate(lat)]
    totals = journal(tmp_path, rows)
    exact = sorted(lat)
    for q in (0.5, 0.95, 0.99):
        got = tally.latency_quantile(totals.latency, q)
        want = exact[int(q * (len(exact) - 1))]
        assert got is not None and abs(got / want - 1) < 0.011, (q, got, want)
    assert totals.latency_max == max(lat) and totals.tried == 3000


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("mode", ["async"])  # the tally is the engines' ledger rows either way
def test_run_writes_charts_beside_report_and_links_them(tmp_path: Path, mode: str) -> None:
    path = write_recipients(tmp_path / "in.parquet", 1200)
    rep = run_campaign(campaign(tmp_path, path, charts=True, mode=mode, concurrency_per_actor=20,
                                fail_rate=0.1, seed=3))
    run_dir = tmp_path / "runs" / "test"
    assert list(rep.charts) == NAMES  # type: ignore[union-attr]
    saved = json.loads((run_dir / "report.json").read_text())
    assert saved["charts"] == NAMES and "chart_errors" not in saved
    md = (run_dir / "report.md").read_text()
    for n in NAMES:
        assert_png(run_dir / n)
        assert f"![{n}]({n})" in md
