"""The pipeline end to end on real local Ray: Parquet in, ledger and report out."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from pipeline.campaign import run_campaign
from pipeline.sending.fake import fake_outcome

from .conftest import campaign, read_ledger, write_recipients

pytestmark = pytest.mark.usefixtures("ray_session")


def test_every_recipient_sent_exactly_once(tmp_path: Path) -> None:
    path = write_recipients(tmp_path / "in.parquet", 3000)
    rep = run_campaign(campaign(tmp_path, path, actors=4, threads_per_actor=20))
    led = read_ledger(tmp_path)
    assert led.height == 3000
    assert led["id"].n_unique() == 3000
    assert set(led["id"].to_list()) == set(range(3000))
    assert (led["status"] == "sent").all()
    assert (led["attempts"] == 1).all()
    # Every row names the actor and node that sent it, and the pool really spread the work.
    assert led["actor"].null_count() == 0 and led["node"].null_count() == 0
    assert led["actor"].n_unique() == 4
    assert led["message_id"].str.starts_with("<test.").all()
    assert rep.counts.sent == 3000 and rep.counts.reconciled


def test_one_actor_one_thread(tmp_path: Path) -> None:
    path = write_recipients(tmp_path / "in.parquet", 40)
    rep = run_campaign(campaign(tmp_path, path, actors=1, threads_per_actor=1))
    assert read_ledger(tmp_path).height == 40
    assert rep.counts.sent == 40


def test_more_actors_than_rows(tmp_path: Path) -> None:
    path = write_recipients(tmp_path / "in.parquet", 3)
    rep = run_campaign(campaign(tmp_path, path, actors=6, threads_per_actor=4))
    led = read_ledger(tmp_path)
    assert sorted(led["id"].to_list()) == [0, 1, 2]
    assert rep.counts.sent == 3
    # Three batches of one row: three actors ran (batching.pool_for), and the report says so.
    assert rep.config.actors == 3 and rep.config.total_concurrency == 12


def test_zero_rows_ends_cleanly_with_empty_report(tmp_path: Path) -> None:
    path = write_recipients(tmp_path / "in.parquet", 0)
    rep = run_campaign(campaign(tmp_path, path))
    assert rep.counts.input_rows == 0 and rep.counts.sent == 0
    assert rep.counts.reconciled
    assert read_ledger(tmp_path).height == 0
    assert (tmp_path / "runs/test/report.json").exists()


def test_failures_recorded_with_error_and_counts_add_up(tmp_path: Path) -> None:
    rows = 2000
    path = write_recipients(tmp_path / "in.parquet", rows)
    rep = run_campaign(campaign(tmp_path, path, fail_rate=0.2, seed=7,
                                retry=__import__("pipeline").RetryPolicy(max_attempts=1)))
    led = read_ledger(tmp_path)
    expected_failed = {i for i in range(rows)
                       if not fake_outcome(7, i, 1, fail_rate=0.2, permanent_fail_rate=0).ok}
    failed = led.filter(pl.col("status") == "failed")
    assert set(failed["id"].to_list()) == expected_failed
    assert 300 < len(expected_failed) < 500  # about 20%
    assert failed["error"].str.contains("421").all()
    assert led.filter(pl.col("status") == "sent")["error"].null_count() == rows - len(expected_failed)
    c = rep.counts
    assert c.sent + c.failed == rows == c.input_rows
    assert c.reconciled


def test_report_has_every_stage_and_agrees_with_ledger(tmp_path: Path) -> None:
    path = write_recipients(tmp_path / "in.parquet", 1500)
    rep = run_campaign(campaign(tmp_path, path, actors=3, threads_per_actor=10, charts=True))
    saved = json.loads((tmp_path / "runs/test/report.json").read_text())
    assert saved["counts"] == rep.to_json()["counts"]  # type: ignore[union-attr]
    for stage in ("load", "ray_start", "partition", "send", "ledger", "ray_stop", "report"):
        assert stage in saved["stages_s"], stage
        assert saved["stages_s"][stage] >= 0
    led = read_ledger(tmp_path)
    assert saved["counts"]["sent"] == led.filter(pl.col("status") == "sent").height
    first = led["started_at"].min().timestamp()  # type: ignore[union-attr]
    last = led["finished_at"].max().timestamp()  # type: ignore[union-attr]
    assert saved["send"]["window_s"] == pytest.approx(last - first, abs=0.01)
    assert saved["send"]["emails_per_s"] == pytest.approx(1500 / (last - first), rel=0.01)
    lat = saved["latency_s"]
    assert 0.01 <= lat["p50"] <= lat["p95"] <= lat["p99"]
    assert saved["latency_s"]["p50"] == pytest.approx(
        float(led["latency_s"].quantile(0.5, "linear")), abs=1e-3)
    assert 0 < saved["send"]["efficiency"] <= 1.05
    assert [op["operator"] for op in saved["ray_data"]][-1].startswith("MapBatches")
    md = (tmp_path / "runs/test/report.md").read_text()
    assert "| sent | 1,500 |" in md


def test_a_report_that_cannot_be_built_fails_the_run(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The report is built on a thread while Ray stops: its failure still reaches the caller,
    and nothing claims the run finished."""
    from pipeline import report

    def broken(**kwargs: object) -> None:
        raise RuntimeError("report broke")

    monkeypatch.setattr(report, "build", broken)
    path = write_recipients(tmp_path / "in.parquet", 200)
    with pytest.raises(RuntimeError, match="report broke"):
        run_campaign(campaign(tmp_path, path, actors=1, threads_per_actor=10))
    manifest = json.loads((tmp_path / "runs/test/campaign.json").read_text())
    assert manifest["state"] != "finished" and not (tmp_path / "runs/test/report.json").exists()
    assert read_ledger(tmp_path).height == 200  # the sends are recorded all the same


def test_input_with_only_an_email_column(tmp_path: Path) -> None:
    """No id (derived from row order), no name (the default subject drops it), still sent."""
    path = tmp_path / "in.parquet"
    pl.DataFrame({"email": [f"only{i}@example.com" for i in range(50)]}).write_parquet(path)
    rep = run_campaign(campaign(tmp_path, path))
    led = read_ledger(tmp_path)
    assert sorted(led["id"].to_list()) == list(range(50))
    assert (led["status"] == "sent").all() and rep.counts.reconciled
