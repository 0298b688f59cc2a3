"""The load's rules cut for a cluster: per block of input rows, per address partition, per id
partition. Plain polars functions; `load_stage.py` runs them as Ray tasks.

Every row gets exactly one fate, first match wins: `invalid` (bad address, or a line break in a
header field), `duplicate` (a valid address seen on an earlier row, compared trimmed and with
the domain lower-cased; `duplicate_of` names the kept row's id), `suppressed`, else to send;
then ids the ledger already holds an outcome for are left out (resume).

Rows are partitioned by their address, lower-cased (`part_of`): all rows of one address, and the
suppression entry that matches them, meet in one partition, so duplicates and suppression are
settled there without looking elsewhere. The ledger is laid out by the same partitions, so the
resume reads only its own partition's rows. The number of partitions is fixed for a campaign
(its manifest keeps it): the hash is CRC-32, the same on every machine and every version.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import polars as pl

from . import addresses
from .ledger import DUPLICATE, INVALID, SUPPRESSED
from .messages import HEADER_UNSAFE_POLARS
from .recipients import is_text

PART = "_part"
# A partition's rows meet in one task (about 0.3 GB for 500,000 rows at most); two partitions
# for 1M rows keep both cores of a small machine busy in the load and the fold.
ROWS_PER_PARTITION = 500_000


def partitions_for(rows: int) -> int:
    """How many address partitions a new campaign of `rows` input rows gets: one per 500,000
    rows up to 64, then growing with the square root (1B rows: 358 of 2.8M rows each), so the
    map × partition pieces the driver tracks stay in the hundreds of thousands."""
    if rows <= 64 * ROWS_PER_PARTITION:
        return max(1, math.ceil(rows / ROWS_PER_PARTITION))
    return math.ceil(64 * math.sqrt(rows / (64 * ROWS_PER_PARTITION)))


def part_of(emails: pl.Series, partitions: int) -> pl.Series:
    """The address partition of each (trimmed) address: CRC-32 of its lower-cased UTF-8 bytes,
    modulo `partitions`; a missing address goes to partition 0. Lower-casing the whole address
    puts every spelling the dedupe key treats as one (same local part, any domain case) and the
    suppression key (the whole address lower-cased) in the same partition."""
    if partitions == 1:
        return pl.Series(PART, [0] * emails.len(), dtype=pl.Int32)
    crc = zlib.crc32
    lowered = emails.str.to_lowercase().to_list()
    return pl.Series(PART, [0 if e is None else crc(e.encode()) % partitions for e in lowered],
                     dtype=pl.Int32)


def header_unsafe(columns: Sequence[str]) -> pl.Expr:
    """The first of `columns` holding a line break (header injection) per row, else null."""
    out = pl.lit(None, pl.String)
    for c in reversed(columns):
        hit = pl.col(c).cast(pl.String).str.contains(HEADER_UNSAFE_POLARS).fill_null(False)
        out = pl.when(hit).then(pl.lit(c)).otherwise(out)
    return out


@dataclass(frozen=True, kw_only=True)
class Rules:
    """What every task of the load needs to know about the input."""

    schema: dict[str, pl.DataType]  # the user's columns (all files together), in order
    header_fields: tuple[str, ...] = ("name",)  # template fields that land in a header
    partitions: int = 1

    @property
    def has_id(self) -> bool:
        return "id" in self.schema

    @property
    def fields(self) -> tuple[str, ...]:
        """Template fields the messages can use: every user column but id and email."""
        return tuple(c for c in self.schema if c not in ("id", "email"))

    @property
    def unsafe_columns(self) -> list[str]:
        # Only text can carry a raw line break: other types render through repr() (escaped).
        return [c for c in dict.fromkeys(self.header_fields)
                if c in self.fields and is_text(self.schema[c]) and self.schema[c] != pl.Null]


def user_schema(schema: pl.Schema) -> dict[str, pl.DataType]:
    """The columns the load reads: names starting with '_' are reserved for internal ones."""
    return {c: t for c, t in schema.items() if not c.startswith("_")}


def validate(frame: pl.DataFrame, *, rules: Rules, first_row: int) -> pl.DataFrame:
    """One block of input rows (the user's columns) with `_row` (its place in the whole input,
    from `first_row`), `id`, trimmed `email`, `_reason` (why it is invalid, else null), `_norm`
    (the dedupe key) and `_part` (its address partition)."""
    missing = [pl.lit(None, dtype).alias(c) for c, dtype in rules.schema.items()
               if c not in frame.columns]
    lf = frame.lazy().with_columns(missing).select(
        [pl.col(c).cast(t) if frame.schema.get(c, t) != t else pl.col(c)
         for c, t in rules.schema.items()])
    lf = lf.with_row_index("_row", offset=first_row).with_columns(
        pl.col("_row").cast(pl.Int64),
        addresses.trim(pl.col("email").cast(pl.String)).alias("email"),
        # strict=False: an unsigned id beyond int64 becomes null, refused by null_ids().
        (pl.col("id").cast(pl.Int64, strict=False) if rules.has_id
         else pl.col("_row").cast(pl.Int64)).alias("id"),
    )
    lf = addresses.annotate(lf, "email", reason="_reason", key="_norm")
    if rules.unsafe_columns:
        lf = lf.with_columns(_unsafe=header_unsafe(rules.unsafe_columns)).with_columns(
            pl.when(pl.col("_unsafe").is_not_null())
            .then(pl.format("CR, LF or another line break in column '{}' (header injection)",
                            pl.col("_unsafe")))
            .otherwise(pl.col("_reason")).alias("_reason")).drop("_unsafe")
    out = lf.collect()
    return out.with_columns(part_of(out["email"], rules.partitions))


def split(frame: pl.DataFrame, partitions: int) -> list[pl.DataFrame]:
    """`frame` cut by `_part` into `partitions` frames (empty ones included), in row order."""
    if partitions == 1:
        return [frame]
    by = frame.partition_by(PART, as_dict=True, maintain_order=True)
    empty = frame.clear()
    return [by.get((p,), empty) for p in range(partitions)]


@dataclass(frozen=True, kw_only=True)
class IdCheck:
    """What one id partition found: ids repeated on several rows (the whole input's ids meet
    by `id` modulo the partitions), with the repeat that comes first in the input."""

    repeated: int = 0
    # id, first row, second row, same address (None: not known yet, load_stage asks)
    first: tuple[int, int, int, bool | None] | None = None


def null_ids(frame: pl.DataFrame) -> tuple[int, int | None]:
    """How many rows of a validated block have no usable id, and the first such row."""
    bad = frame.filter(pl.col("id").is_null())
    return bad.height, (int(bad["_row"][0]) if bad.height else None)


def id_block(frame: pl.DataFrame, *, first_row: int) -> pl.DataFrame:
    """A block of the input's `id` column only, with `_row`: what the id check of a load in
    waves reads of every row before the first wave sends (about 15 s less at 20M rows than
    `validate`'s columns; whether a repeat has the same address is asked of its two rows only,
    `same_address`)."""
    return frame.lazy().with_row_index("_row", offset=first_row).select(
        pl.col("id").cast(pl.Int64, strict=False), pl.col("_row").cast(pl.Int64)).collect()


def same_address(emails: Sequence[str | None]) -> bool:
    """Whether two addresses are one for the dedupe (trimmed, the domain lower-cased)."""
    keys = pl.DataFrame({"email": list(emails)}, schema={"email": pl.String}).select(
        addresses.normalise(addresses.trim(pl.col("email"))))["email"].to_list()
    return bool(keys[0] == keys[1])


def id_keys(frame: pl.DataFrame) -> pl.DataFrame:
    """The columns the id check needs: id, row, and the dedupe key's hash (same address?)."""
    return frame.select("id", "_row", pl.col("_norm").hash().alias("_h"))


def check_ids(frames: Sequence[pl.DataFrame]) -> IdCheck:
    frame = pl.concat(list(frames)) if frames else pl.DataFrame()
    if frame.height == 0 or frame["id"].n_unique() == frame.height:
        return IdCheck()
    same = [pl.col("_h").n_unique().alias("n")] if "_h" in frame.columns else []
    repeated = (frame.group_by("id").agg(pl.col("_row").sort().head(2), *same)
                .filter(pl.col("_row").list.len() > 1).sort(pl.col("_row").list.first()))
    if repeated.height == 0:
        return IdCheck()
    row = repeated.row(0, named=True)
    return IdCheck(repeated=repeated.height,
                   first=(int(row["id"]), int(row["_row"][0]), int(row["_row"][1]),
                          row["n"] == 1 if same else None))


def merge_id_checks(checks: Sequence[IdCheck]) -> IdCheck:
    found = [c for c in checks if c.first is not None]
    if not found:
        return IdCheck()
    first = min(found, key=lambda c: c.first[1] if c.first else 0).first
    return IdCheck(repeated=sum(c.repeated for c in found), first=first)


@dataclass(frozen=True, kw_only=True)
class PartitionCounts:
    input_rows: int = 0
    to_send: int = 0
    settled: int = 0
    already_done: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # invalid / duplicate / suppressed
    settled_at: float | None = None  # when its task settled it (epoch seconds, that node's clock)


@dataclass(frozen=True, kw_only=True)
class Settled:
    """One address partition after the load: rows to send, ledger rows settled at load, counts."""

    to_send: pl.DataFrame  # id, email, template fields, _part, _row (in input order)
    settled: pl.DataFrame  # ledger rows: id, email, status, attempts, error, duplicate_of
    keepers: pl.DataFrame  # _norm, id: this wave's kept row per address (for the waves after)
    input_rows: int = 0
    already_done: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # invalid / duplicate / suppressed

    @property
    def summary(self) -> PartitionCounts:
        return PartitionCounts(input_rows=self.input_rows, to_send=self.to_send.height,
                               settled=self.settled.height,
                               already_done=self.already_done, counts=self.counts)


def settle(frames: Sequence[pl.DataFrame], *, fields: Sequence[str],
           suppression: pl.Series | None = None, done: pl.Series | None = None,
           earlier: Sequence[pl.DataFrame] = ()) -> Settled:
    """Settle one address partition of one wave (load_stage.py): every validated row of the
    wave whose address falls in it, the suppression keys of the partition, the ids the ledger
    already finished (resume), and the rows kept by the earlier waves (`Settled.keepers` of
    each: the waves come in input order, so an address kept there is a duplicate here)."""
    frame = pl.concat(list(frames), how="vertical_relaxed").sort("_row")
    valid = pl.col("_reason").is_null()
    first_of = (frame.filter(valid).group_by("_norm", maintain_order=True)
                .agg(pl.col("id").first().alias("_dup_of")))
    prior = [e for e in earlier if e.height]
    if prior:
        before = pl.concat(prior).rename({"id": "_before"})
        first_of = first_of.join(before, on="_norm", how="left", maintain_order="left")
        keepers = first_of.filter(pl.col("_before").is_null()).select("_norm", id="_dup_of")
        first_of = first_of.select("_norm", pl.coalesce("_before", "_dup_of").alias("_dup_of"))
    else:
        keepers = first_of.select("_norm", id="_dup_of")
    frame = frame.join(first_of, on="_norm", how="left", maintain_order="left")
    is_dup = valid & (pl.col("_dup_of") != pl.col("id"))
    status = pl.when(~valid).then(pl.lit(INVALID)).when(is_dup).then(pl.lit(DUPLICATE))
    if suppression is not None and suppression.len():
        status = status.when(pl.col("email").str.to_lowercase().is_in(suppression.implode())
                             ).then(pl.lit(SUPPRESSED))
    frame = frame.with_columns(
        status.otherwise(pl.lit(None, pl.String)).alias("_status"),
        pl.when(is_dup).then(pl.col("_dup_of")).otherwise(None).alias("_dup_of"),
    )
    input_rows = frame.height
    if done is not None and done.len():
        # Decided over the whole partition first, so a row keeps the same fate on every run;
        # only then are finished ids taken out.
        frame = frame.filter(~pl.col("id").is_in(done.implode()))
    already_done = input_rows - frame.height
    settled_rows = frame.filter(pl.col("_status").is_not_null())
    counts = {s: int((settled_rows["_status"] == s).sum()) for s in (INVALID, DUPLICATE, SUPPRESSED)}
    settled = settled_rows.select(
        "id", "email", pl.col("_status").alias("status"), pl.lit(0, pl.Int32).alias("attempts"),
        pl.when(pl.col("_status") == INVALID).then(pl.col("_reason"))
        .when(pl.col("_status") == DUPLICATE)
        # Not pl.format: polars 2.1 panics on it over a column of several chunks (a later
        # wave's join with the keepers of several earlier waves gives one).
        .then(pl.lit("duplicate of id ") + pl.col("_dup_of").cast(pl.String))
        .otherwise(pl.lit("address is on the suppression list")).alias("error"),
        pl.col("_dup_of").alias("duplicate_of"), PART, "_row",
    )
    to_send = frame.filter(pl.col("_status").is_null()).select("id", "email", *fields, PART, "_row")
    return Settled(to_send=to_send, settled=settled, keepers=keepers, input_rows=input_rows,
                   already_done=already_done, counts=counts)


@dataclass(frozen=True, kw_only=True)
class LoadSummary:
    """The whole input's fates, summed over the partitions (what the report and progress need)."""

    input_rows: int
    to_send: int
    already_done: int
    counts: dict[str, int] = field(default_factory=dict)  # invalid / duplicate / suppressed
    fields: tuple[str, ...] = ()  # template fields available to messages
    partitions: int = 1
    sizes: tuple[int, ...] = ()  # rows to send per partition
    settled_sizes: tuple[int, ...] = ()  # rows settled at load per partition
    waves: int = 1  # of the load (load_stage.py): each wave's partitions count in `sizes`
    # When the last partition of the whole list settled (epoch seconds); None when some never
    # did (a stopped run in waves cancels the waves still loading: the resume loads them).
    loaded_at: float | None = None


def summarise(parts: Sequence[PartitionCounts], *, fields: tuple[str, ...],
              partitions: int, waves: int = 1) -> LoadSummary:
    """`parts`: the partitions of `waves` waves, or of fewer (a stopped or broken load: then
    the summary has no `loaded_at`)."""
    counts = {s: sum(p.counts.get(s, 0) for p in parts) for s in (INVALID, DUPLICATE, SUPPRESSED)}
    stamps = [p.settled_at for p in parts if p.settled_at is not None]
    loaded_at = max(stamps) if stamps and len(stamps) == partitions * waves else None
    return LoadSummary(input_rows=sum(p.input_rows for p in parts),
                       to_send=sum(p.to_send for p in parts),
                       already_done=sum(p.already_done for p in parts), counts=counts,
                       fields=fields, partitions=partitions,
                       sizes=tuple(p.to_send for p in parts),
                       settled_sizes=tuple(p.settled for p in parts), waves=waves,
                       loaded_at=loaded_at)


def split_suppression(keys: pl.DataFrame | None, partitions: int) -> list[pl.Series | None]:
    """The suppression keys (`_key`: trimmed, lower-cased) by address partition."""
    if keys is None or keys.height == 0:
        return [None] * partitions
    parted = keys.with_columns(part_of(keys["_key"], partitions))
    return [s.get_column("_key") for s in split(parted, partitions)]
