"""The load on the cluster (load_stage.py running partitions.py's rules as Ray tasks) against
the plain polars computation of the same rules over the whole list at once
(tests/reference_load.py): row by row, the same fate, reason and `duplicate_of`."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import generate, load_dataset, partitions, recipients
from pipeline.campaign import run_campaign
from pipeline.hooks import Hooks

from . import reference_load
from .conftest import campaign, read_ledger
from .loading import load
from .test_recipients import _corrupt_pages

pytestmark = pytest.mark.usefixtures("ray_session")


def _distributed_fates(loaded: object) -> pl.DataFrame:
    settled = loaded.settled.select("id", "status", "error", "duplicate_of")  # type: ignore[attr-defined]
    to_send = loaded.to_send.select("id").with_columns(  # type: ignore[attr-defined]
        status=pl.lit(None, pl.String), error=pl.lit(None, pl.String),
        duplicate_of=pl.lit(None, pl.Int64))
    return pl.concat([settled, to_send]).sort("id")


def _dirty(rows: int, seed: int) -> pl.DataFrame:
    return generate.generate(rows, seed=seed, invalid_fraction=0.08, duplicate_fraction=0.12,
                             injection_fraction=0.03, intl_fraction=0.05)


def _suppression(df: pl.DataFrame, every: int) -> pl.DataFrame:
    # Upper-cased and padded: the list matches on the trimmed, lower-cased address.
    emails = [f"  {e.upper()} " for e in df["email"].drop_nulls().to_list()[1::every]]
    return (pl.DataFrame({"_key": emails}).select(pl.col("_key").str.strip_chars().str.to_lowercase())
            .unique())


@pytest.mark.parametrize(("parts", "row_group", "wave_rows"),
                         [(1, 10_000, 0), (13, 333, 0), (13, 333, 500), (1, 250, 250)])
def test_dirty_file_fates_match_the_plain_computation(parts: int, row_group: int,
                                                      wave_rows: int) -> None:
    """In one wave or several (of 666, 1,332 and 1,002 rows; of 250, 500, 1,000 and 1,250): a
    later wave's row of an address an earlier wave kept is its duplicate."""
    df = _dirty(3000, seed=5)
    keys = _suppression(df, 40)
    want = reference_load.fates(df, suppression=keys).sort("id")
    loaded = load(df, suppression=keys, parts=parts, row_group_size=row_group,
                  wave_rows=wave_rows)
    assert loaded.stage is not None and len(loaded.stage.waves) == (
        {500: 3, 250: 4}[wave_rows] if wave_rows else 0)
    got = _distributed_fates(loaded)
    assert got.rows() == want.rows()
    assert want["status"].value_counts().height == 4  # invalid, duplicate, suppressed, to send


@pytest.mark.parametrize("wave_rows", [0, 300], ids=["one-wave", "waves"])
def test_a_run_records_the_same_fates_in_its_ledger(tmp_path: Path, wave_rows: int) -> None:
    """End to end: the ledger of a real run holds, for every row settled at load, the fate the
    plain computation gives; every other row was sent. In waves (of 400, 800 and 300 rows)
    too: the later waves' settled rows are written while the first one sends."""
    df = _dirty(1500, seed=8)
    path = tmp_path / "dirty.parquet"
    df.write_parquet(path, row_group_size=200)
    keys = _suppression(df, 30)
    unsub = tmp_path / "unsub.txt"
    unsub.write_text("\n".join(keys["_key"].to_list()) + "\n")
    said: list[tuple[float, str]] = []
    started = time.time()  # the run's own start is this or a few µs later
    rep = run_campaign(campaign(tmp_path, path, suppress=str(unsub), wave_rows=wave_rows),
                       hooks=Hooks(on_info=lambda line: said.append((time.time(), line))))
    ((sending, line),) = [(t, x) for t, x in said if ": sending " in x]
    assert ("(first wave of 3; 1,500 rows in all)" in line) == bool(wave_rows)
    # When the whole list was in: in waves after the first wave's line (the later waves load
    # once the senders are up), in one wave before it; never after the last email started.
    assert rep.waves == (3 if wave_rows else 1) and rep.list_loaded_after_s is not None
    loaded_at = started + rep.list_loaded_after_s
    assert (loaded_at > sending) == bool(wave_rows), (loaded_at - sending, line)
    last = read_ledger(tmp_path).filter(pl.col("status") == "sent")["started_at"].max()
    assert loaded_at <= last.timestamp() + 0.01  # type: ignore[union-attr]
    assert rep.first_email_after_s is not None and rep.first_email_after_s <= rep.total_s
    led = read_ledger(tmp_path).sort("id")
    want = reference_load.fates(df, suppression=keys).sort("id")
    assert led["id"].to_list() == want["id"].to_list()
    got = led.select("id", pl.when(pl.col("status") == "sent").then(None)
                     .otherwise(pl.col("status")).alias("status"),
                     pl.when(pl.col("status") == "sent").then(None).otherwise(pl.col("error"))
                     .alias("error"), "duplicate_of")
    assert got.rows() == want.rows()
    assert rep.counts.reconciled and rep.counts.sent == want["status"].null_count()  # type: ignore[union-attr]


_LOCALS = st.sampled_from(["ana", "Bo", "c.d", "e+f", "Zoë", "用户", "x_y", "q"])
_DOMAINS = st.sampled_from(["example.com", "Mail.Example", "bücher.example", "x.org", "nodot"])


@st.composite
def _lists(draw: st.DrawFn) -> tuple[pl.DataFrame, pl.DataFrame]:
    base = draw(st.lists(st.tuples(_LOCALS, st.integers(0, 40), _DOMAINS), min_size=1, max_size=160))
    emails: list[str | None] = []
    for local, n, domain in base:
        shape = draw(st.sampled_from(["plain", "upper-domain", "padded", "upper-all", "null", "bad"]))
        address = f"{local}{n}@{domain}"
        if shape == "upper-domain":
            address = f"{local}{n}@{domain.upper()}"
        elif shape == "padded":
            address = f"  {address}\t"
        elif shape == "upper-all":
            address = address.upper()
        elif shape == "bad":
            address = address.replace("@", "@@")
        emails.append(None if shape == "null" else address)
    ids = draw(st.permutations(list(range(len(emails)))))
    frame = pl.DataFrame({"id": [i * 7 - 300 for i in ids], "email": emails,
                          "name": [f"N{i}" for i in range(len(emails))]},
                         schema={"id": pl.Int64, "email": pl.String, "name": pl.String})
    picked = draw(st.lists(st.sampled_from([e for e in emails if e] or ["none@x.org"]), max_size=8))
    keys = (pl.DataFrame({"_key": picked or ["nobody@nowhere.example"]}, schema={"_key": pl.String})
            .select(pl.col("_key").str.strip_chars().str.to_lowercase()).unique())
    return frame, keys


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_lists(), parts=st.integers(1, 9), groups=st.integers(1, 5),
       wave_rows=st.sampled_from([0, 1, 30]))
def test_random_lists_match_the_plain_computation(data: tuple[pl.DataFrame, pl.DataFrame],
                                                  parts: int, groups: int,
                                                  wave_rows: int) -> None:
    """Planted duplicates differ in case and whitespace; suppressed addresses are picked from the
    list; ids are shuffled and negative; any number of partitions and row groups, in one wave
    or in several."""
    frame, keys = data
    got = _distributed_fates(load(frame, suppression=keys, parts=parts,
                                  row_group_size=max(1, frame.height // groups),
                                  wave_rows=wave_rows))
    assert got.rows() == reference_load.fates(frame, suppression=keys).sort("id").rows()


def test_partition_of_an_address_never_changes() -> None:
    """The ledger is laid out by these numbers across runs and machines: CRC-32 of the trimmed,
    lower-cased address. A change here would make a resume look in the wrong partition."""
    emails = pl.Series(["Ada@Example.com", "ada@example.com", "zoë@bücher.example", None])
    # crc32(b"ada@example.com") = 0x871CD6A0 = 2266814112
    assert partitions.part_of(emails, 1000).to_list() == [112, 112, 14, 0]


def test_units_are_row_groups_numbered_across_files(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    generate.generate(250, seed=1).write_parquet(folder / "a.parquet", row_group_size=100)
    generate.generate(40, seed=2).write_parquet(folder / "b.parquet", row_group_size=100)
    units = recipients.units(str(folder))
    assert [(Path(u.file).name, u.row_group, u.first_row, u.rows) for u in units] == [
        ("a.parquet", 0, 0, 100), ("a.parquet", 1, 100, 100), ("a.parquet", 2, 200, 50),
        ("b.parquet", 0, 250, 40)]


def test_waves_are_row_groups_in_order_each_twice_the_one_before(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    generate.generate(1000, seed=1).write_parquet(path, row_group_size=100)
    units = recipients.units(str(path))
    sizes = [sum(u.rows for u in w) for w in recipients.waves(units, 150)]
    assert sizes == [200, 300, 500]  # at least 150, then 300, then the rest
    assert [u for w in recipients.waves(units, 150) for u in w] == units
    assert recipients.waves(units, 0) == [units] == recipients.waves(units, 1000)
    assert recipients.waves([], 150) == [[]]


def test_ids_repeated_across_waves_stop_the_load_before_a_wave_settles() -> None:
    """The ids of every wave are checked before the first one sends: a repeat in the last wave
    of the first wave's id is the same one-line error as in one wave."""
    from pipeline.errors import UsageError
    df = generate.generate(900, seed=4)
    df = df.with_columns(pl.when(pl.col("id") == 850).then(3).otherwise(pl.col("id")).alias("id"))
    for wave_rows in (0, 100):
        with pytest.raises(UsageError, match=r"column 'id' repeats \(1 ids; e\.g\. id 3 on rows 3 "
                           r"and 850, with different addresses\)"):
            load(df, row_group_size=100, wave_rows=wave_rows)
    # The same address (the domain's case and spaces aside): asked of those two rows only.
    local, domain = df["email"][3].split("@")
    twin = df.with_row_index("_r").with_columns(
        pl.when(pl.col("_r") == 850).then(pl.lit(f" {local}@{domain.upper()}"))
        .otherwise(pl.col("email")).alias("email")).drop("_r")
    for wave_rows in (0, 100):
        with pytest.raises(UsageError, match=r"id 3 on rows 3 and 850, with the same address"):
            load(twin, row_group_size=100, wave_rows=wave_rows)
    nulls = df.with_columns(pl.when(pl.col("id") == 700).then(None).otherwise(pl.col("id"))
                            .alias("id"))
    with pytest.raises(UsageError, match=r"1 empty or out-of-range values \(first at row 700\)"):
        load(nulls, row_group_size=100, wave_rows=100)


def test_a_file_without_ids_beside_files_with_them_is_named_in_waves_too(tmp_path: Path) -> None:
    from pipeline.errors import UsageError
    folder = tmp_path / "in"
    folder.mkdir()
    generate.generate(300, seed=1).write_parquet(folder / "a.parquet", row_group_size=100)
    generate.generate(200, seed=2).drop("id").write_parquet(folder / "b.parquet")
    for wave_rows in (0, 100):
        with pytest.raises(UsageError, match=r"column 'id' has 200 empty or out-of-range values "
                           r"\(first at row 300\)"):
            load(str(folder), wave_rows=wave_rows)


def test_a_cluster_the_senders_would_fill_loads_in_one_wave() -> None:
    """The later waves' tasks need half a CPU beside the senders': without it they would never
    run, so the list loads in one wave instead."""
    import ray
    df = generate.generate(600, seed=2)
    assert load(df, row_group_size=100, wave_rows=100).stage.later is not None  # type: ignore[union-attr]
    cpus = float(ray.cluster_resources()["CPU"])
    assert load(df, row_group_size=100, wave_rows=100,
                reserved_cpus=cpus - 0.5).stage.later is None  # type: ignore[union-attr]


def test_rows_to_send_come_in_blocks_of_a_batch() -> None:
    out = load(_dirty(2000, seed=2), parts=3, block_rows=150).stage
    assert out is not None
    import ray
    sizes = [ray.get(r).num_rows for r in out.to_send]
    assert max(sizes) <= 150 and sum(sizes) == out.summary.to_send
    assert len(sizes) >= out.summary.to_send // 150
    # Each partition's last block is short; Ray Data joins blocks into batches of 150, so
    # there are fewer batches than blocks (batching.pool_for sizes the pool by them).
    assert out.batches == -(-out.summary.to_send // 150) < len(sizes)
    few = dataclasses.replace(out, summary=dataclasses.replace(out.summary, to_send=20))
    assert few.batches == 1


def test_the_dataset_of_the_blocks_is_the_one_ray_data_builds_from_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # load_dataset.dataset_of describes the blocks from what the partitions' tasks reported,
    # instead of asking each block in a task (`from_arrow_refs`): the same rows, schema, block
    # sizes and bytes.
    import ray

    out = load(_dirty(2000, seed=3), parts=3, block_rows=150).stage
    assert out is not None
    theirs = ray.data.from_arrow_refs(out.to_send)
    with monkeypatch.context() as m:  # built without Ray's per-block tasks
        m.setattr(ray.data, "from_arrow_refs", None)
        ours = out.dataset()
    assert ours.count() == theirs.count() == out.summary.to_send
    assert ours.schema() == theirs.schema()
    assert ours.num_blocks() == theirs.num_blocks() == len(out.to_send)
    # A slice's nbytes before Ray serialises it, against after: a few bytes a block apart.
    assert abs(ours.size_bytes() - theirs.size_bytes()) <= 0.01 * theirs.size_bytes()
    shapes = [rows for b in out.blocks for rows, _ in b.shapes]
    assert shapes == [ray.get(r).num_rows for r in out.to_send]
    # Whole rows, every column.
    assert (sorted(ours.take_all(), key=lambda r: r["id"])
            == sorted(theirs.take_all(), key=lambda r: r["id"]))
    with pytest.raises(RuntimeError, match="described"):  # a description that does not match
        load_dataset.dataset_of(out.to_send, out.blocks[:1])


def test_the_dataset_of_waves_reads_every_wave_and_nothing_of_a_broken_one(
        tmp_path: Path) -> None:
    """Every row to send of every wave; a wave whose file cannot be read gives no rows, nor do
    the waves after it, and `finish` names the file."""
    from pipeline import load_stage
    from pipeline.errors import UsageError
    df = _dirty(2000, seed=6).drop("id")
    out = load(df, parts=3, row_group_size=200, block_rows=90, wave_rows=300).stage
    assert out is not None and len(out.waves) == 3
    rows = out.dataset().take_all()
    summary, error = load_stage.finish(out)
    assert error is None and len(rows) == summary.to_send > out.summary.to_send
    # Loaded once the last partition of the last wave settled, after the first wave.
    assert summary.waves == 3 and out.summary.waves == 1
    assert summary.loaded_at is not None and out.summary.loaded_at is not None
    assert summary.loaded_at > out.summary.loaded_at
    assert sorted(r["id"] for r in rows) == (  # without an id column, ids are row numbers
        reference_load.fates(df).filter(pl.col("status").is_null())["id"].to_list())

    folder = tmp_path / "in"
    folder.mkdir()
    df[:600].write_parquet(folder / "a.parquet", row_group_size=300)
    df[600:1200].write_parquet(folder / "b.parquet", row_group_size=300)
    df[1200:].write_parquet(folder / "c.parquet", row_group_size=300)
    _corrupt_pages(folder / "b.parquet")
    rules = partitions.Rules(schema=partitions.user_schema(df.schema), partitions=2)
    broken = load_stage.load(recipients.units(str(folder)), rules=rules, source=str(folder),
                             suppression=None, resume_from=None, block_rows=90, wave_rows=300)
    assert [w.rows for w in broken.waves] == [300, 600, 1100]
    sent = broken.dataset().take_all()
    assert {r["_row"] for r in sent} <= set(range(300)) and len(sent) == broken.summary.to_send
    summary, error = load_stage.finish(broken)
    assert summary.input_rows == 300 and error is not None
    assert summary.loaded_at is None  # the broken wave and the one after it never loaded
    assert error.startswith(f"--input {folder / 'b.parquet'}: cannot read the recipients")
    with pytest.raises(UsageError):  # and in one wave, before anything is settled
        load_stage.load(recipients.units(str(folder)), rules=rules, source=str(folder),
                        suppression=None, resume_from=None, block_rows=90)


def test_partitions_grow_with_the_list_but_stay_few() -> None:
    assert partitions.partitions_for(0) == 1 and partitions.partitions_for(1000) == 1
    assert partitions.partitions_for(1_000_000) == 2
    assert partitions.partitions_for(5_000_000) == 10
    assert partitions.partitions_for(20_000_000) == 40
    assert partitions.partitions_for(1_000_000_000) == 358
