"""Recipients: the generator, scan, suppression lists, and every row's fate at load.

Unit tests run on plain polars frames; the two end-to-end tests at the bottom go through
`run_campaign` on the session's real Ray and check the ledger row by row.
"""

from __future__ import annotations

import datetime as dt
import decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import generate, recipients
from pipeline.campaign import run_campaign
from pipeline.errors import UsageError
from pipeline.sending.fake import fake_outcome

from .conftest import campaign, read_ledger
from .loading import load

# The load runs on Ray (load_stage.py): every test here may reach it.
pytestmark = pytest.mark.usefixtures("ray_session")

# --------------------------------------------------------------------------- generate


def test_generate_plants_exact_counts_with_labels() -> None:
    rows = 2000
    df = generate.generate(rows, seed=3, invalid_fraction=0.1, duplicate_fraction=0.05,
                             injection_fraction=0.02, intl_fraction=0.04, label=True)
    counts = dict(df.group_by("planted").len().iter_rows())
    assert counts == {"invalid": 200, "duplicate": 100, "injection": 40, "intl": 80, "clean": 1580}
    assert df["planted"][0] == "clean"
    dups = df.filter(pl.col("planted") == "duplicate")
    sources = df.filter(pl.col("id").is_in(dups["planted_of"].implode()))
    assert (dups["planted_of"] < dups["id"]).all()
    assert (sources["planted"] == "clean").all()
    assert df.filter(pl.col("planted") != "duplicate")["planted_of"].null_count() == rows - 100
    assert df.equals(generate.generate(rows, seed=3, invalid_fraction=0.1, duplicate_fraction=0.05,
                                         injection_fraction=0.02, intl_fraction=0.04, label=True))


def test_generate_without_fractions_is_clean_and_unlabelled() -> None:
    df = generate.generate(500, seed=1)
    assert df.columns == ["id", "email", "name", "city", "plan", "signup_year"]
    assert df["email"].n_unique() == 500
    assert load(df.lazy()).to_send.height == 500


@pytest.mark.parametrize(("kwargs", "flag"), [
    ({"invalid_fraction": 1.5}, "--invalid-fraction"),
    ({"duplicate_fraction": -0.1}, "--duplicate-fraction"),
    ({"injection_fraction": 2.0}, "--injection-fraction"),
    ({"invalid_fraction": 0.6, "duplicate_fraction": 0.6}, "fraction"),
])
def test_generate_rejects_bad_fractions(kwargs: dict[str, Any], flag: str) -> None:
    with pytest.raises(UsageError, match=flag):
        generate.generate(10, **kwargs)


# --------------------------------------------------------------------------- load: fates


def _fates(loaded: recipients.Loaded) -> dict[int, str]:
    out = {i: "send" for i in loaded.to_send["id"].to_list()}
    for i, s in loaded.settled.select("id", "status").iter_rows():
        assert i not in out, f"id {i} got two fates"
        out[i] = s
    return out


def test_load_gives_every_planted_row_its_fate() -> None:
    df = generate.generate(3000, seed=5, invalid_fraction=0.08, duplicate_fraction=0.08,
                             injection_fraction=0.03, intl_fraction=0.05, label=True)
    clean = df.filter(pl.col("planted") == "clean")["id"].to_list()
    suppressed = set(clean[5::40])
    supp = pl.DataFrame({"_key": df.filter(pl.col("id").is_in(list(suppressed)))["email"]
                         .str.to_uppercase().str.to_lowercase()})
    loaded = load(df.lazy(), suppression=supp)
    fates = _fates(loaded)
    assert len(fates) == loaded.input_rows == 3000
    expected = {}
    for i, kind in df.select("id", "planted").iter_rows():
        expected[i] = {"clean": "send", "intl": "send", "invalid": "invalid",
                       "injection": "invalid", "duplicate": "duplicate"}[kind]
    expected.update({i: "suppressed" for i in suppressed})
    assert fates == expected
    settled = loaded.settled
    dup_of = dict(settled.filter(pl.col("status") == "duplicate").select("id", "duplicate_of").iter_rows())
    assert dup_of == dict(df.filter(pl.col("planted") == "duplicate").select("id", "planted_of").iter_rows())
    assert settled.filter(pl.col("status") == "invalid")["error"].null_count() == 0
    assert loaded.counts == {"invalid": 240 + 90, "duplicate": 240, "suppressed": len(suppressed)}


def test_duplicates_compare_trimmed_with_the_domain_lowered() -> None:
    df = pl.DataFrame({
        "email": ["a@x.com", " a@X.COM\t", "A@x.com", "bad", "a@x.com",
                  "c@y.com\n", "c@y.com", "d@z.com", "d@z.com", "\u00a0e@w.org"],
        "name": ["n", "n", "n", "n", "n", "n", "n", "Eve\r\nBcc: v@x.com", "ok", "n"],
    })
    loaded = load(df.lazy())
    settled = {r["id"]: r for r in loaded.settled.iter_rows(named=True)}
    assert loaded.to_send["id"].to_list() == [0, 2, 6, 8, 9]  # local parts are case-sensitive
    assert settled[1]["status"] == "duplicate" and settled[1]["duplicate_of"] == 0
    assert settled[4]["duplicate_of"] == 0 and settled[4]["error"] == "duplicate of id 0"
    assert settled[3]["status"] == "invalid"
    # An invalid row is never "kept": the next valid one with that address is sent.
    assert settled[5]["status"] == "invalid" and 6 not in settled
    assert "column 'name'" in settled[7]["error"] and 8 not in settled
    assert loaded.to_send.filter(pl.col("id") == 1).height == 0
    assert loaded.to_send["email"].to_list()[-1] == "e@w.org"  # trimmed before sending


@pytest.mark.parametrize(("emails", "same"), [
    (["a@x.com", "b@x.com", "c@x.com"], "different addresses"),
    (["a@x.com", "b@x.com", "a@X.COM"], "the same address"),
])
def test_repeated_ids_are_a_usage_error_naming_the_column(emails: list[str], same: str) -> None:
    df = pl.DataFrame({"id": [7, 8, 7], "email": emails})
    with pytest.raises(UsageError) as err:
        load(df.lazy(), source="in.parquet")
    msg = str(err.value)
    assert "--input in.parquet" in msg and "column 'id'" in msg and "id 7 on rows 0 and 2" in msg
    assert same in msg and "\n" not in msg


@pytest.mark.parametrize("ids", [
    pl.Series("id", [1, None, 3], dtype=pl.Int64),
    pl.Series("id", [1, 2**63 + 5, 3], dtype=pl.UInt64),
])
def test_null_or_out_of_range_ids_are_a_usage_error(ids: pl.Series) -> None:
    df = pl.DataFrame({"id": ids, "email": ["a@x.com", "b@x.com", "c@x.com"]})
    with pytest.raises(UsageError, match="column 'id' has 1 empty or out-of-range values"):
        load(df.lazy())


def test_header_injection_in_any_header_field_is_invalid() -> None:
    df = pl.DataFrame({
        "email": [f"u{i}@example.com" for i in range(8)],
        "name": ["Ok", "Eve\r\nBcc: v@x.com", "Ok", "Ok", None, "Zed\u2028Bcc: v@x.com", "Ok", "Tab\tok"],
        "city": ["Lima", "Lima", "Lima\nX-Evil: 1", "Lima", "Lima", "Lima", None, "Lima"],
        "body_only": ["x\r\ny"] * 8,  # not in a header: multi-line is fine
        "tags": [["a\r\nb"]] * 8,     # not text: renders escaped, never a raw line break
    }).with_columns(pl.col("city").cast(pl.Categorical))
    loaded = load(df.lazy(), header_fields=("name", "city", "tags", "missing"))
    invalid = dict(loaded.settled.select("id", "error").iter_rows())
    assert set(invalid) == {1, 2, 5}
    assert "column 'name'" in invalid[1] and "column 'city'" in invalid[2]
    assert "header injection" in invalid[5]
    # Only the fields in headers are checked.
    assert load(df.lazy(), header_fields=("body_only",)).to_send.height == 0
    assert load(df.lazy(), header_fields=()).to_send.height == 8


def test_extra_columns_of_any_type_pass_through_and_underscores_are_ignored() -> None:
    df = _exotic_frame(6)
    loaded = load(df.lazy())
    assert loaded.to_send.height == 6
    assert "_row" not in loaded.fields and "_status" not in loaded.fields
    for col in ("tags", "profile", "blob", "born", "balance", "seen_at", "kind", "nothing"):
        assert col in loaded.fields
        assert loaded.to_send.schema[col] == df.schema[col]


def test_resume_keeps_fates_and_counts_done_ids(tmp_path: Path) -> None:
    """The resume reads each partition's own ledger rows: settled rows and the first 100 to
    send recorded as sent, the next load skips exactly those and keeps every fate."""
    from pipeline import ledger, partitions
    df = generate.generate(400, seed=2, invalid_fraction=0.1, duplicate_fraction=0.1)
    path = tmp_path / "in.parquet"
    df.write_parquet(path, row_group_size=90)
    first = load(str(path))
    run_dir = str(tmp_path / "run")
    sent = first.to_send.head(100).select("id", "email", status=pl.lit("sent"))
    done = pl.concat([first.settled.select("id", "email", "status"), sent])
    ledger.write_frame(run_dir, done.with_columns(
        partitions.part_of(done["email"], 3).alias("part")), name="done")
    again = load(str(path), resume_from=run_dir)
    assert again.input_rows == 400 and again.already_done == done.height
    assert again.settled.height == 0
    assert again.to_send["id"].to_list() == first.to_send["id"].to_list()[100:]


def test_zero_rows_load_cleanly() -> None:
    df = generate.generate(0)
    loaded = load(df.lazy())
    assert loaded.input_rows == 0 and loaded.to_send.height == 0 and loaded.settled.height == 0


def test_all_null_email_column_is_all_invalid() -> None:
    df = pl.DataFrame({"email": [None, None]}, schema={"email": pl.Null})
    loaded = load(df.lazy())
    assert loaded.settled["error"].to_list() == ["empty address"] * 2


# --------------------------------------------------------------------------- scan and files


def _corrupt_pages(path: Path) -> None:
    """Flip bytes inside the data pages, leaving the footer (schema) intact."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    for i in range(64, len(data) - 8 - footer - 64, 7):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_broken_data_pages_are_a_usage_error_naming_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    generate.generate(500, seed=1).write_parquet(folder / "a.parquet")
    generate.generate(500, seed=2).write_parquet(folder / "b.parquet", compression="zstd")
    _corrupt_pages(folder / "b.parquet")
    recipients.scan(str(folder))  # the footers are fine
    with pytest.raises(UsageError) as err:
        load(str(folder), source=str(folder))
    msg = str(err.value)
    assert msg.startswith(f"--input {folder / 'b.parquet'}: cannot read the recipients (")
    assert "\n" not in msg


def test_scan_names_the_file_without_an_email_column(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    generate.generate(5).write_parquet(folder / "a.parquet")
    pl.DataFrame({"mail": ["x"], "name": ["y"]}).write_parquet(folder / "b.parquet")
    with pytest.raises(UsageError, match=r"b\.parquet: no 'email' column \(columns found: mail, name\)"):
        recipients.scan(str(folder))


# --------------------------------------------------------------------------- suppression


def test_suppression_text_file(tmp_path: Path) -> None:
    path = tmp_path / "unsub.txt"
    path.write_text("\ufeffUser1@Example.com\n# a comment\n\n   user2@example.com  \r\nuser9@x.org\n",
                    encoding="utf-8")
    keys = recipients.read_suppression(str(path))
    assert sorted(keys["_key"].to_list()) == ["user1@example.com", "user2@example.com", "user9@x.org"]


def test_suppression_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "unsub.parquet"
    pl.DataFrame({"reason": ["bounce", "unsub", "unsub"], "email": ["USER1@example.com", None, " u3@x.org"]}
                 ).with_columns(pl.col("email").cast(pl.Categorical)).write_parquet(path)
    keys = recipients.read_suppression(str(path))
    assert sorted(keys["_key"].to_list()) == ["u3@x.org", "user1@example.com"]


def test_suppression_matches_case_insensitively(tmp_path: Path) -> None:
    df = generate.generate(50)
    path = tmp_path / "unsub.txt"
    path.write_text("USER3@" + df["email"][3].split("@")[1].upper() + "\nuser7@nowhere.example\n")
    loaded = load(df.lazy(), suppression=recipients.read_suppression(str(path)))
    assert loaded.settled.select("id", "status").rows() == [(3, "suppressed")]
    assert loaded.settled["error"][0] == "address is on the suppression list"


def _write(path: Path, content: bytes | pl.DataFrame) -> None:
    if isinstance(content, pl.DataFrame):
        content.write_parquet(path)
    else:
        path.write_bytes(content)


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("missing.txt", None, "no such file"),
    ("adir", "dir", "is a directory"),
    ("nocol.parquet", pl.DataFrame({"mail": ["a@x.com"]}), "no 'email' column (columns found: mail)"),
    ("int.parquet", pl.DataFrame({"email": [1, 2]}), "column 'email' must be text, found Int64"),
    ("broken.parquet", b"PAR1" + b"\x00" * 40, "not a readable Parquet file"),
    ("binary.txt", b"\xff\xfe\x00garbage\x81", "neither Parquet nor UTF-8 text"),
])
def test_suppression_file_errors(tmp_path: Path, name: str, content: object, expected: str) -> None:
    path = tmp_path / name
    if isinstance(content, str):
        path.mkdir()
    elif isinstance(content, bytes | pl.DataFrame):
        _write(path, content)
    with pytest.raises(UsageError) as err:
        recipients.read_suppression(str(path))
    msg = str(err.value)
    assert msg.startswith(f"--suppress {path}: ") and expected in msg and "\n" not in msg


# --------------------------------------------------------------------------- end to end


def _exotic_frame(rows: int) -> pl.DataFrame:
    """Awkward but legal input: every extra column type, unusual names, nulls."""
    names = ["Zoë 😀 Ünïcødé", "山田 太郎", "Ω" * 5000, None, "O'Brien, \"The\" <Boss>", "🙂" * 300]
    return pl.DataFrame({
        "id": list(range(rows)),
        "email": [f"user{i}@example.com" if i % 3 else f"zoë{i}@bücher.example" for i in range(rows)],
        "name": [names[i % len(names)] for i in range(rows)],
        "city": [None if i % 2 else "Łódź" for i in range(rows)],
        "tags": [["a", "b"] if i % 2 else [] for i in range(rows)],
        "profile": [{"age": i, "langs": ["pt", "en"]} for i in range(rows)],
        "blob": [bytes([i % 256, 0, 255]) for i in range(rows)],
        "born": [dt.date(1990, 1, 1 + i % 28) for i in range(rows)],
        "balance": [decimal.Decimal(f"{i}.25") for i in range(rows)],
        "seen_at": [dt.datetime(2024, 1, 1, tzinfo=dt.UTC)] * rows,
        "wait": [dt.timedelta(seconds=i) for i in range(rows)],
        "kind": ["a", "b"] * (rows // 2) + ["a"] * (rows % 2),
        "nothing": [None] * rows,
        "_row": ["collides with an internal name"] * rows,
        "_status": [1] * rows,
    }, schema_overrides={"balance": pl.Decimal(12, 2), "nothing": pl.Null}).with_columns(
        pl.col("kind").cast(pl.Enum(["a", "b"])), pl.col("id").cast(pl.UInt32))


@pytest.mark.usefixtures("ray_session")
def test_dirty_file_every_row_accounted_end_to_end(tmp_path: Path) -> None:
    rows, seed, p_fail = 1200, 11, 0.1
    df = generate.generate(rows, seed=4, invalid_fraction=0.1, duplicate_fraction=0.1,
                             injection_fraction=0.03, intl_fraction=0.05, label=True)
    path = tmp_path / "dirty.parquet"
    df.write_parquet(path)
    planted = {k: set(g["id"].to_list()) for (k,), g in df.group_by("planted")}
    suppressed = set(sorted(planted["clean"])[3::25])
    unsub = tmp_path / "unsub.txt"
    unsub.write_text("# bounced\n" + "\n".join(
        e.upper() for e in df.filter(pl.col("id").is_in(list(suppressed)))["email"]) + "\n")
    to_send = (planted["clean"] | planted["intl"]) - suppressed
    failed = {i for i in to_send if not fake_outcome(seed, i, 1, fail_rate=0,
                                                     permanent_fail_rate=p_fail).ok}
    send_log = tmp_path / "sends.log"

    rep = run_campaign(campaign(tmp_path, path, suppress=str(unsub), seed=seed,
                                permanent_fail_rate=p_fail, send_log=str(send_log)))

    led = read_ledger(tmp_path)
    assert led.height == rows and led["id"].n_unique() == rows
    by_status = {k: set(g["id"].to_list()) for (k,), g in led.group_by("status")}
    assert by_status == {
        "sent": to_send - failed, "failed": failed,
        "invalid": planted["invalid"] | planted["injection"],
        "duplicate": planted["duplicate"], "suppressed": suppressed,
    }
    # Row by row: each duplicate points at the row the generator copied.
    dups = led.filter(pl.col("status") == "duplicate").select("id", "duplicate_of").sort("id")
    planted_dups = df.filter(pl.col("planted") == "duplicate").select("id", "planted_of").sort("id")
    assert dups.rows() == planted_dups.rows()
    settled = led.filter(pl.col("status").is_in(["invalid", "duplicate", "suppressed"]))
    assert (settled["attempts"] == 0).all() and settled["error"].null_count() == 0
    inj = led.filter(pl.col("id").is_in(list(planted["injection"])))
    assert inj["error"].str.contains("column 'name'").all()
    # Nothing settled at load ever reached the sender.
    delivered = {int(x) for x in send_log.read_text().split()}
    assert delivered == to_send - failed
    c = rep.counts
    assert (c.input_rows, c.sent, c.failed, c.invalid, c.duplicate, c.suppressed) == (
        rows, len(to_send - failed), len(failed), len(by_status["invalid"]), len(planted["duplicate"]),
        len(suppressed))
    assert c.reconciled

    # A resume finds every row already done, and still reconciles.
    again = run_campaign(campaign(tmp_path, path, suppress=str(unsub), seed=seed,
                                  permanent_fail_rate=p_fail, send_log=str(send_log)))
    assert again.counts.already_done == rows and again.counts.reconciled
    assert read_ledger(tmp_path).height == rows


@pytest.mark.usefixtures("ray_session")
def test_exotic_columns_and_names_do_not_break_a_run(tmp_path: Path) -> None:
    rows = 60
    path = tmp_path / "exotic.parquet"
    _exotic_frame(rows).write_parquet(path)
    rep = run_campaign(campaign(tmp_path, path, message=__import__("pipeline").MessageConfig(
        subject="Hi {{ name }} in {{ city }} ({{ profile }}, {{ tags }})")))
    led = read_ledger(tmp_path)
    assert sorted(led["id"].to_list()) == list(range(rows))
    assert (led["status"] == "sent").all()
    assert rep.counts.sent == rows and rep.counts.reconciled
