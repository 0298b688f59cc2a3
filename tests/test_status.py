"""`pipeline.status`: campaign status and export over real ledgers, local and on S3 (moto).

Ledgers are written with the ledger's own writers (LedgerWriter, write_frame,
fold_all), campaign.json as the run writes it. No Ray.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from pipeline import export, ledger, ledger_scan, status, storage
from pipeline.errors import UsageError

from .conftest import S3_BUCKET

T0 = 1_750_000_000.0  # an arbitrary "now" for the fixed-time tests
BUCKET = S3_BUCKET


# --------------------------------------------------------------------------- helpers


def _campaign_json(run_dir: str, *, state: str, input_rows: int, to_send: int | None = None,
                   already_done: int = 0, run_id: str = "r1", started_at: float = T0 - 600,
                   finished_at: float | None = None, name: str = "spring") -> None:
    storage.makedirs(run_dir)
    storage.write_text(storage.join(run_dir, "campaign.json"), json.dumps({
        "campaign": name, "input": "in.parquet", "input_rows": input_rows,
        "to_send": input_rows - already_done if to_send is None else to_send,
        "already_done": already_done, "run_id": run_id, "started_at": started_at,
        "finished_at": finished_at, "state": state}))


def _record(w: ledger.LedgerWriter, ids: range | list[int], status_: str, at: float, *,
            error: str | None = None, step: float = 0.0) -> None:
    for k, i in enumerate(ids):
        t = at + k * step
        w.record(i, f"user{i}@example.com", status_, 1, error, t - 0.5, t, 0.5,
                 f"<{i}.{status_}@bulkmail>" if status_ == ledger.SENT else None)


def _writer(run_dir: str, run: str = "r1", name: str = "a0") -> ledger.LedgerWriter:
    return ledger.LedgerWriter(run_dir, writer=name, node="n1", run=run, flush_seconds=0)


def _settled(run_dir: str, ids: list[int], status_: str, *, run: str = "r1") -> None:
    ledger.write_frame(run_dir, pl.DataFrame({
        "id": ids, "email": [f"user{i}@example.com" for i in ids],
        "status": [status_] * len(ids), "attempts": [0] * len(ids), "run": [run] * len(ids),
    }), name=f"load-{run}-{status_}")


def _counts(frame: pl.DataFrame) -> dict[str, int]:
    got = {s: 0 for s in ledger.FINAL_STATUSES}
    got.update({str(s): int(n) for s, n in frame.group_by("status").len().iter_rows()})
    return got


def _check_rendering(st: status.Status) -> None:
    lines = st.lines(now=T0)
    assert lines and all(len(line) <= 100 for line in lines), lines
    data = st.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["counts"] == st.counts and data["done"] == st.done


def _finished_campaign(run_dir: str) -> None:
    """A campaign of 130 recipients over two runs: run 1 failed ids 0-29, run 2 resent 0-9."""
    _settled(run_dir, [100, 101, 102], ledger.INVALID)
    _settled(run_dir, [103, 104], ledger.DUPLICATE)
    _settled(run_dir, [105], ledger.SUPPRESSED)
    w = _writer(run_dir)
    _record(w, range(0, 20), ledger.FAILED, T0 - 900, error="550 5.1.1 mailbox unavailable")
    _record(w, range(20, 28), ledger.FAILED, T0 - 900, error="421 try later")
    _record(w, range(28, 30), ledger.FAILED, T0 - 900, error=None)
    w.flush()
    _record(w, range(30, 100), ledger.SENT, T0 - 800, step=1.0)
    _record(w, range(106, 130), ledger.SENT, T0 - 700)
    w.close()
    # A second run (--retry-failed): 0-9 sent this time, later than their failure.
    w2 = _writer(run_dir, run="r2")
    _record(w2, range(0, 10), ledger.SENT, T0 - 100, step=0.5)
    w2.close()
    _campaign_json(run_dir, state="finished", input_rows=130, to_send=30, run_id="r2",
                   started_at=T0 - 120, finished_at=T0 - 90)


# --------------------------------------------------------------------------- status


def test_finished_campaign_counts_are_the_ledgers_latest_rows(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "runs" / "spring")
    _finished_campaign(run_dir)
    st = status.campaign_status(run_dir, now=T0)
    expected = _counts(ledger.read_ledger(run_dir))
    assert st.counts == expected
    # 0-9 failed then sent: counted once, as sent.
    assert st.counts == {"sent": 70 + 24 + 10, "failed": 20, "invalid": 3, "duplicate": 2,
                         "suppressed": 1}
    assert st.done == st.total == 130 and st.state == "finished" and st.campaign == "spring"
    assert st.run_id == "r2"
    assert st.rate_per_s_last_minute is None and st.eta_s is None
    assert st.top_failures == (("550 5.1.1 mailbox unavailable", 10), ("421 try later", 8),
                               (status.NO_ERROR_TEXT, 2))
    assert st.last_activity == pytest.approx(T0 - 100 + 9 * 0.5)
    assert st.holder is None and not st.holder_active
    _check_rendering(st)
    assert any("421 try later" in line for line in st.lines(now=T0))


def test_stopped_half_way_is_not_done_and_has_no_eta(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "half")
    w = _writer(run_dir)
    _record(w, range(400), ledger.SENT, T0 - 30, step=0.05)  # recent rows, yet not running
    w.close()
    _campaign_json(run_dir, state="stopped", input_rows=1000, started_at=T0 - 50,
                   finished_at=T0 - 10)
    st = status.campaign_status(run_dir, now=T0)
    assert (st.done, st.total, st.state) == (400, 1000, "stopped")
    assert st.counts["sent"] == 400 and st.eta_s is None and st.rate_per_s_last_minute is None
    assert st.to_json()["remaining"] == 600
    _check_rendering(st)


def test_rate_over_the_last_minute_and_eta_while_running(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "live")
    _settled(run_dir, [9000, 9001], ledger.INVALID)  # final but not "tried": not in the rate
    w = _writer(run_dir)
    _record(w, range(0, 50), ledger.SENT, T0 - 300)  # outside the window
    w.record(50, "user50@example.com", ledger.SENT, 1, None, None, T0 - 60, None, None)  # edge: out
    _record(w, range(100, 190), ledger.SENT, T0 - 59, step=0.4)  # 90 sent, up to T0 - 23.4
    _record(w, range(200, 230), ledger.FAILED, T0 - 10, error="boom")  # 30 failed in the window
    w.close()
    # to_send leaves out the 2 settled at load, as the run counts it.
    _campaign_json(run_dir, state="running", input_rows=1000, to_send=998, started_at=T0 - 600)
    st = status.campaign_status(run_dir, now=T0)
    assert st.rate_per_s_last_minute == pytest.approx(120 / 60)
    done = 2 + 51 + 90 + 30
    assert st.done == done and st.total == 1000
    assert st.eta_s == pytest.approx((1000 - done) / 2.0)
    _check_rendering(st)

    # A run younger than a minute: the rate is over its age, and only over its age.
    _campaign_json(run_dir, state="running", input_rows=1000, to_send=998, started_at=T0 - 20)
    young = status.campaign_status(run_dir, now=T0)
    assert young.rate_per_s_last_minute == pytest.approx(30 / 20)
    assert young.eta_s == pytest.approx((1000 - done) / 1.5)


def test_eta_of_a_retry_failed_run_counts_what_this_run_still_has_to_send(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "retry")
    w = _writer(run_dir, run="r0")
    _record(w, range(0, 900), ledger.SENT, T0 - 9000)
    _record(w, range(900, 1000), ledger.FAILED, T0 - 9000, error="421")
    w.close()
    # Failed is final, so every recipient is done; this run resends the 100 failed ones.
    w = _writer(run_dir, run="r1")
    _record(w, range(900, 930), ledger.SENT, T0 - 30)
    w.close()
    _campaign_json(run_dir, state="running", input_rows=1000, to_send=100, already_done=900,
                   run_id="r1", started_at=T0 - 120)
    st = status.campaign_status(run_dir, now=T0)
    assert st.done == st.total == 1000 and st.counts["failed"] == 70
    assert st.rate_per_s_last_minute == pytest.approx(0.5)
    assert st.eta_s == pytest.approx(70 / 0.5)


def test_a_run_that_has_only_written_campaign_json(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "runs" / "fresh")
    _campaign_json(run_dir, state="running", input_rows=500, started_at=T0 - 2)
    assert status.resolve_run_dir("fresh", runs_dir=str(tmp_path / "runs")) == run_dir
    st = status.campaign_status(run_dir, now=T0)
    assert (st.done, st.total, st.last_activity, st.eta_s) == (0, 500, None, None)
    assert st.counts == dict.fromkeys(ledger.FINAL_STATUSES, 0)
    assert st.rate_per_s_last_minute == 0.0
    _check_rendering(st)
    out = tmp_path / "none.csv"
    assert export.export(run_dir, str(out)) == 0
    assert out.read_text().strip() == ",".join(export.EXPORT_COLUMNS)


def test_without_campaign_json_state_is_unknown_and_total_is_the_ledger(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "old")
    w = _writer(run_dir)
    _record(w, range(25), ledger.SENT, T0 - 5000)
    _record(w, range(25, 30), ledger.FAILED, T0 - 5000, error="x")
    w.close()
    st = status.campaign_status(run_dir, now=T0)
    assert (st.state, st.total, st.done, st.campaign, st.run_id) == ("unknown", 30, 30, "old", None)
    assert st.rate_per_s_last_minute is None and st.eta_s is None  # no activity for an hour
    # ... but rows within the last minute look alive: a rate, still no ETA (state unknown).
    w = _writer(run_dir, name="a1")
    _record(w, range(30, 60), ledger.SENT, T0 - 30)
    w.close()
    st = status.campaign_status(run_dir, now=T0)
    assert st.rate_per_s_last_minute == pytest.approx(30 / 60) and st.eta_s is None
    _check_rendering(st)


def test_consolidated_ledger_plus_new_parts(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "c")
    w = _writer(run_dir)
    _record(w, range(0, 300), ledger.SENT, T0 - 3000)
    _record(w, range(300, 400), ledger.FAILED, T0 - 3000, error="421")
    w.close()
    ledger.fold_all(run_dir)
    assert storage.list_files(ledger.ledger_dir(run_dir), ".parquet") == []
    w2 = _writer(run_dir, run="r2")
    _record(w2, range(300, 350), ledger.SENT, T0 - 30)  # failed in run 1, sent in run 2
    _record(w2, range(400, 450), ledger.SENT, T0 - 30)  # new recipients
    w2.close()
    _campaign_json(run_dir, state="running", input_rows=600, to_send=250, run_id="r2",
                   already_done=400, started_at=T0 - 100)
    st = status.campaign_status(run_dir, now=T0)
    assert st.counts == _counts(ledger.read_ledger(run_dir))
    assert st.counts["sent"] == 400 and st.counts["failed"] == 50 and st.done == 450
    assert st.rate_per_s_last_minute == pytest.approx(100 / 60)
    # Remaining: 150 never tried (600 - 450); this run has settled 100 of its 250.
    assert st.eta_s == pytest.approx(150 / (100 / 60))
    assert st.top_failures == (("421", 50),)


def test_status_of_a_campaign_being_written_only_grows(tmp_path: Path) -> None:
    """Parts keep arriving and are consolidated (deleted) under the reader's feet."""
    run_dir = str(tmp_path / "busy")
    _campaign_json(run_dir, state="running", input_rows=6000, started_at=time.time())
    stop = threading.Event()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            w = _writer(run_dir)
            for batch in range(60):
                ids = range(batch * 100, batch * 100 + 100)
                if batch % 5 == 4:  # the ids of the previous batch: failed first, then sent
                    _record(w, range(batch * 100 - 100, batch * 100 - 90), ledger.SENT, time.time())
                if batch % 5 == 3:
                    _record(w, ids, ledger.FAILED, time.time(), error="421")
                else:
                    _record(w, ids, ledger.SENT, time.time())
                w.flush()
                if batch % 15 == 14:
                    ledger.fold_all(run_dir)
                time.sleep(0.005)
            w.close()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            stop.set()

    producer = threading.Thread(target=produce)
    producer.start()
    seen: list[status.Status] = []
    try:
        while not stop.is_set():
            seen.append(status.campaign_status(run_dir))
    finally:
        producer.join()
    assert not errors
    final = status.campaign_status(run_dir)
    seen.append(final)
    assert len(seen) >= 3, "the producer finished before status could look"
    dones = [s.done for s in seen]
    sents = [s.counts["sent"] for s in seen]
    assert dones == sorted(dones) and sents == sorted(sents)
    assert final.counts == _counts(ledger.read_ledger(run_dir))
    assert final.done == 6000 and final.counts["failed"] == 12 * 90


def test_a_part_that_vanishes_between_listing_and_reading_is_read_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = str(tmp_path / "v")
    w = _writer(run_dir)
    for k in range(5):
        _record(w, range(k * 10, k * 10 + 10), ledger.SENT, T0 - 100)
        w.flush()
    w.close()
    listings: list[list[str]] = []
    real_sources = ledger_scan._sources

    def consolidating_after_the_first_listing(rd: str) -> list[str]:
        paths = real_sources(rd)
        listings.append(paths)
        if len(listings) == 1:  # the end of the run folds the parts in right now
            ledger.fold_all(rd)
        return paths

    monkeypatch.setattr(ledger_scan, "_sources", consolidating_after_the_first_listing)
    st = status.campaign_status(run_dir, now=T0)
    assert st.counts["sent"] == 50 and len(listings) == 2
    assert listings[1] == [ledger.consolidated_file(run_dir, 0)]


def test_a_broken_part_is_an_error_after_a_few_attempts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = str(tmp_path / "broken")
    w = _writer(run_dir)
    _record(w, range(10), ledger.SENT, T0)
    w.close()
    (tmp_path / "broken" / "ledger" / "00000" / "part-zz.parquet").write_bytes(b"not parquet at all")
    calls: list[str] = []
    real_sources = ledger_scan._sources
    monkeypatch.setattr(ledger_scan, "_sources", lambda rd: calls.append(rd) or real_sources(rd))
    with pytest.raises((OSError, pl.exceptions.PolarsError)):
        status.campaign_status(run_dir, now=T0)
    assert len(calls) == 3


def test_holder_from_the_lease(tmp_path: Path) -> None:
    lease = pytest.importorskip("pipeline.lease", reason="pipeline/lease.py not written yet")
    run_dir = str(tmp_path / "leased")
    w = _writer(run_dir)
    _record(w, range(10), ledger.SENT, T0 - 5)
    w.close()
    _campaign_json(run_dir, state="running", input_rows=20, started_at=T0 - 60)
    held = lease.Lease.acquire(run_dir, run_id="r1", ttl=30.0, clock=lambda: T0 - 5)
    st = status.campaign_status(run_dir, now=T0)
    holder = lease.read_holder(run_dir)
    assert holder is not None and st.holder == holder.describe(T0) and st.holder_active
    assert "r1" in (st.holder or "")
    # Past its ttl since the last heartbeat: still reported, no longer active.
    late = status.campaign_status(run_dir, now=T0 + 60)
    assert late.holder is not None and not late.holder_active
    assert any("no live run holds the lease" in line for line in late.lines(now=T0 + 60))
    held.release()
    released = status.campaign_status(run_dir, now=T0)
    assert not released.holder_active and "released" in (released.holder or "")
    _check_rendering(st)


# --------------------------------------------------------------------------- export


def _expected_export(run_dir: str, statuses: list[str] | None = None) -> pl.DataFrame:
    frame = ledger.read_ledger(run_dir)
    if statuses is not None:
        frame = frame.filter(pl.col("status").is_in(statuses))
    return frame.select(export.EXPORT_COLUMNS).sort("id")


def test_export_parquet_and_csv_filtered_by_status(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "runs" / "spring")
    _finished_campaign(run_dir)
    w = _writer(run_dir, run="r3", name="odd")  # error text a CSV must quote
    _record(w, [130], ledger.FAILED, T0 - 50, error='554 "no", really,\nnot here')
    w.close()

    out = tmp_path / "all.parquet"
    n = export.export(run_dir, str(out), format="parquet")
    expected = _expected_export(run_dir)
    assert n == expected.height == 131
    assert_frame_equal(pl.read_parquet(out), expected)

    failed = tmp_path / "failed.csv"
    n = export.export(run_dir, str(failed), statuses=["failed"])
    expected = _expected_export(run_dir, ["failed"])
    back = pl.read_csv(failed, schema=expected.schema)
    assert n == back.height == 21
    assert_frame_equal(back, expected)
    assert not set(back["id"].to_list()) & set(range(10))  # failed then sent: not in "failed"

    # Several statuses, given as the CLI may (a comma list), into a binary stream.
    buf = io.BytesIO()
    n = export.export(run_dir, buf, statuses=["sent,invalid", "suppressed"], format="csv")
    expected = _expected_export(run_dir, ["sent", "invalid", "suppressed"])
    buf.seek(0)
    assert n == expected.height == 108
    assert_frame_equal(pl.read_csv(buf, schema=expected.schema), expected)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


def test_export_of_a_ledger_without_rows_of_that_status(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "s")
    w = _writer(run_dir)
    _record(w, range(5), ledger.SENT, T0)
    w.close()
    out = tmp_path / "dup.parquet"
    assert export.export(run_dir, str(out), statuses=["duplicate"], format="parquet") == 0
    back = pl.read_parquet(out)
    assert back.height == 0 and back.columns == list(export.EXPORT_COLUMNS)


# --------------------------------------------------------------------------- mistakes


def _one_line(excinfo: pytest.ExceptionInfo[UsageError]) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def test_resolve_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    _campaign_json(str(runs / "spring"), state="running", input_rows=1)
    w = _writer(str(tmp_path / "elsewhere"))
    _record(w, [1], ledger.SENT, T0)
    w.close()
    assert status.resolve_run_dir("spring", runs_dir=str(runs)) == str(runs / "spring")
    assert status.resolve_run_dir(str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path)  # a bare name is looked for under runs/, then here
    assert status.resolve_run_dir("elsewhere") == "elsewhere"

    with pytest.raises(UsageError) as e:
        status.resolve_run_dir("autumn", runs_dir=str(runs))
    message = _one_line(e)
    assert "autumn" in message and str(runs / "autumn") in message
    with pytest.raises(UsageError) as e:
        status.resolve_run_dir(str(tmp_path / "nowhere"))
    assert "no such run directory" in _one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError) as e:
        status.resolve_run_dir(str(tmp_path / "empty"))
    assert "no ledger" in _one_line(e)
    with pytest.raises(UsageError):
        status.resolve_run_dir("  ")


def test_mistakes_are_usage_errors_of_one_line(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "x")
    w = _writer(run_dir)
    _record(w, range(3), ledger.SENT, T0)
    w.close()
    with pytest.raises(UsageError) as e:
        status.campaign_status(str(tmp_path / "missing"))
    assert "no such run directory" in _one_line(e)
    (tmp_path / "bare").mkdir()
    with pytest.raises(UsageError) as e:
        export.export(str(tmp_path / "bare"), str(tmp_path / "o.csv"))
    assert "no ledger" in _one_line(e)
    with pytest.raises(UsageError) as e:
        export.export(run_dir, str(tmp_path / "o.csv"), statuses=["sent", "bounced"])
    message = _one_line(e)
    assert "bounced" in message and "sent, failed" in message
    with pytest.raises(UsageError) as e:
        export.export(run_dir, str(tmp_path / "o.csv"), statuses=[])
    _one_line(e)
    with pytest.raises(UsageError) as e:
        export.export(run_dir, str(tmp_path / "o.json"), format="json")  # type: ignore[arg-type]
    assert "json" in _one_line(e)
    with pytest.raises(UsageError) as e:
        export.export(run_dir, str(tmp_path / "no" / "such" / "o.csv"))
    assert "no such directory" in _one_line(e)
    assert not (tmp_path / "o.csv").exists() and not (tmp_path / "o.json").exists()
    (tmp_path / "x" / "campaign.json").write_text("{not json")
    with pytest.raises(UsageError) as e:
        status.campaign_status(run_dir)
    assert "campaign.json" in _one_line(e)


# --------------------------------------------------------------------------- S3


def test_status_and_export_on_s3(s3: Any, tmp_path: Path) -> None:
    runs = f"s3://{BUCKET}/runs"
    run_dir = f"{runs}/spring"
    _finished_campaign(run_dir)
    ledger.fold_all(run_dir)
    w = _writer(run_dir, run="r3")  # a later run, still going
    _record(w, range(130, 160), ledger.SENT, T0 - 20)
    w.flush()
    _record(w, range(30, 35), ledger.FAILED, T0 - 10, error="421 later")  # sent before: now failed
    w.close()
    _campaign_json(run_dir, state="running", input_rows=200, to_send=70, run_id="r3",
                   started_at=T0 - 40)

    assert status.resolve_run_dir("spring", runs_dir=runs) == run_dir
    with pytest.raises(UsageError) as e:
        status.resolve_run_dir("autumn", runs_dir=runs)
    assert f"{runs}/autumn" in _one_line(e)

    st = status.campaign_status(run_dir, now=T0)
    local = ledger.read_ledger(run_dir)
    assert st.counts == _counts(local)
    assert st.counts["sent"] == 104 - 5 + 30 and st.counts["failed"] == 25 and st.done == 160
    assert st.total == 200 and st.state == "running"
    assert st.rate_per_s_last_minute == pytest.approx(35 / 40)
    assert st.eta_s == pytest.approx(max(200 - 160, 70 - 35) / (35 / 40))
    assert st.top_failures[0] == ("550 5.1.1 mailbox unavailable", 10)
    assert st.holder is None and not st.holder_active  # no lease under the S3 prefix
    _check_rendering(st)

    out = tmp_path / "failed.csv"
    n = export.export(run_dir, str(out), statuses=["failed"])
    expected = _expected_export(run_dir, ["failed"])
    assert n == 25
    assert_frame_equal(pl.read_csv(out, schema=expected.schema), expected)
    n = export.export(run_dir, f"s3://{BUCKET}/exports/all.parquet", format="parquet")
    back = pl.from_arrow(storage.read_table(f"s3://{BUCKET}/exports/all.parquet"))
    assert isinstance(back, pl.DataFrame) and n == back.height == 160
    assert_frame_equal(back, _expected_export(run_dir))


# --------------------------------------------------------------------------- size


def _big_ledger(run_dir: str, rows: int, parts: int) -> None:
    """`rows` recipients in `parts` parts, plus every 100th id failed earlier and resent."""
    frame = (pl.DataFrame({"id": pl.int_range(0, rows, eager=True)})
             .with_columns(
                 email=pl.format("user{}@example.com", pl.col("id")),
                 status=pl.when(pl.col("id") % 50 == 7).then(pl.lit(ledger.FAILED))
                 .when(pl.col("id") % 97 == 0).then(pl.lit(ledger.INVALID))
                 .otherwise(pl.lit(ledger.SENT)),
                 attempts=pl.lit(1, pl.Int32),
                 # One a millisecond, the last half a millisecond before T0 (integer micros:
                 # no row on the window's edge).
                 finished_at=pl.from_epoch(int(T0 * 1e6) - 500 - (rows - 1 - pl.col("id")) * 1000,
                                           "us").dt.replace_time_zone("UTC"),
                 run=pl.lit("r1"))
             .with_columns(
                 error=pl.when(pl.col("status") == ledger.FAILED)
                 .then(pl.format("550 reason {}", pl.col("id") % 7)),
                 message_id=pl.when(pl.col("status") == ledger.SENT)
                 .then(pl.format("<{}@bulkmail>", pl.col("id")))))
    per = -(-rows // parts)
    for k in range(parts):
        ledger.write_frame(run_dir, frame.slice(k * per, per), name=f"part-big-{k:06d}")
    earlier = (frame.filter(pl.col("id") % 100 == 1)
               .with_columns(status=pl.lit(ledger.FAILED), error=pl.lit("421 earlier"),
                             message_id=pl.lit(None, pl.String),
                             finished_at=pl.col("finished_at") - dt.timedelta(hours=1)))
    ledger.write_frame(run_dir, earlier, name="part-big-earlier")


def test_two_million_rows_in_a_few_seconds(tmp_path: Path) -> None:
    rows, parts = 2_000_000, 200
    run_dir = str(tmp_path / "big")
    _big_ledger(run_dir, rows, parts)
    _campaign_json(run_dir, state="running", input_rows=rows + 500_000, started_at=T0 - 3600)

    t = time.perf_counter()
    st = status.campaign_status(run_dir, now=T0)
    took = time.perf_counter() - t
    print(f"\ncampaign_status over {rows:,} rows in {parts + 1} parts: {took:.2f} s")
    ids = pl.int_range(0, rows, eager=True)
    failed = int((ids % 50 == 7).sum())
    invalid = int(((ids % 50 != 7) & (ids % 97 == 0)).sum())
    assert st.counts == {"sent": rows - failed - invalid, "failed": failed, "invalid": invalid,
                         "duplicate": 0, "suppressed": 0}
    assert st.done == rows and st.total == rows + 500_000
    # The last 60 s hold 60,000 rows (one a millisecond), of which the invalid do not count.
    window = ids.filter(ids >= rows - 60_000)
    tried = int((~((window % 50 != 7) & (window % 97 == 0))).sum())
    assert st.rate_per_s_last_minute == pytest.approx(tried / 60)
    # The latest failures only: the superseded "421 earlier" rows do not count.
    top = (pl.DataFrame({"id": ids}).filter(pl.col("id") % 50 == 7)
           .group_by(error=pl.format("550 reason {}", pl.col("id") % 7)).len()
           .sort(["len", "error"], descending=[True, False]).head(5))
    assert st.top_failures == tuple(top.iter_rows())
    assert took < 15, f"status took {took:.1f} s"

    out = tmp_path / "sent.parquet"
    t = time.perf_counter()
    n = export.export(run_dir, str(out), statuses=["sent"], format="parquet")
    took = time.perf_counter() - t
    print(f"export of {n:,} sent rows as Parquet: {took:.2f} s")
    assert n == rows - failed - invalid
    back = pl.scan_parquet(out)
    checks = back.select(rows=pl.len(), ids=pl.col("id").n_unique(), ordered=pl.col("id").is_sorted(),
                         sent=(pl.col("status") == ledger.SENT).all()).collect()
    assert checks.row(0) == (n, n, True, True)
    assert took < 30, f"export took {took:.1f} s"
