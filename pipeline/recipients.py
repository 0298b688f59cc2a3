"""Recipients: load them lazily with polars and settle every row's fate at load.

Plain functions over polars frames; nothing here knows about Ray.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import polars as pl

from . import addresses, storage
from .errors import UsageError
from .ledger import DUPLICATE, INVALID, SUPPRESSED
from .messages import HEADER_UNSAFE_POLARS

# --------------------------------------------------------------------------- load

def _input_files(path: str) -> list[str]:
    if storage.is_uri(path):
        if path.endswith(".parquet"):
            if not storage.exists(path):
                raise UsageError(f"--input {path}: no such file")
            return [path]
        files = storage.list_files(path, ".parquet")
        if not files:
            raise UsageError(f"--input {path}: no Parquet files found there")
        return files
    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path))
        if not files:
            raise UsageError(f"--input {path}: the pattern matches no file")
        return files
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        if not files:
            raise UsageError(f"--input {path}: the directory holds no .parquet files")
        return files
    if not os.path.exists(path):
        raise UsageError(f"--input {path}: no such file or directory")
    if not os.access(path, os.R_OK):
        raise UsageError(f"--input {path}: permission denied")
    return [path]


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line (polars and pyarrow messages span several)."""
    text = " ".join(str(exc).split("\n", 1)[0].split())
    return (text or type(exc).__name__)[:limit]


def _is_text(dtype: pl.DataType) -> bool:
    return dtype in (pl.String, pl.Categorical, pl.Null) or isinstance(dtype, pl.Enum)


def _scan_one(f: str) -> pl.LazyFrame:
    try:
        if storage.is_uri(f):
            import pyarrow.dataset as pads
            import pyarrow.parquet as pq
            fs, p = storage.resolve(f)
            pq.read_schema(p, filesystem=fs)  # fail here on a broken footer
            lf = pl.scan_pyarrow_dataset(pads.dataset(p, filesystem=fs, format="parquet"))
        else:
            lf = pl.scan_parquet(f)
        schema = lf.collect_schema()
    except (Exception, pl.exceptions.PanicException) as exc:  # noqa: BLE001 - many types
        raise UsageError(f"--input {f}: not a readable Parquet file ({_first_line(exc)})") from None
    if "email" not in schema:
        found = ", ".join(schema.names()) or "none"
        raise UsageError(f"--input {f}: no 'email' column (columns found: {found})")
    if not _is_text(schema["email"]):
        raise UsageError(f"--input {f}: column 'email' must be text, found {schema['email']}")
    if "id" in schema and not (schema["id"].is_integer() or schema["id"] == pl.Null):
        raise UsageError(f"--input {f}: column 'id' must be an integer, found {schema['id']}")
    return lf


def scan(path: str) -> pl.LazyFrame:
    """A lazy frame over the input, with its schema checked (reads only the Parquet footers).

    A file whose footer is sound but whose data pages are not passes here; `load` reads every
    page and turns that into a UsageError too, still before Ray starts.
    """
    frames = [_scan_one(f) for f in _input_files(path)]
    if len(frames) == 1:
        return frames[0]
    try:
        return pl.concat(frames, how="diagonal_relaxed")
    except Exception as exc:  # noqa: BLE001 - a column with irreconcilable types across files
        raise UsageError(f"--input {path}: the files do not share a schema ({_first_line(exc)})") from None


@dataclass(frozen=True, kw_only=True)
class Loaded:
    """The input split by fate: rows to send, rows settled at load, and the counts."""

    to_send: pl.DataFrame  # id, email, message fields
    settled: pl.DataFrame  # ledger rows for invalid / duplicate / suppressed
    input_rows: int
    already_done: int
    counts: dict[str, int] = field(default_factory=dict)  # invalid/duplicate/suppressed this run
    fields: tuple[str, ...] = ()  # template fields available to messages


def read_suppression(path: str) -> pl.DataFrame:
    """Addresses never to mail, as `_key` (trimmed, lower-cased): Parquet with an `email` column
    (other columns ignored), or UTF-8 text with one address a line (blank lines and lines
    starting with '#' skipped). Matching is case-insensitive on the whole address.
    """
    try:
        if not storage.exists(path):
            raise UsageError(f"--suppress {path}: no such file")
        if storage.is_dir(path):
            raise UsageError(f"--suppress {path}: is a directory, expected a file")
        data = storage.open_bytes(path)
    except OSError as exc:
        raise UsageError(f"--suppress {path}: cannot be read ({_first_line(exc)})") from None
    if data.getvalue()[:4] == b"PAR1":
        try:
            frame = pl.read_parquet(data)
        except (Exception, pl.exceptions.PanicException) as exc:  # noqa: BLE001
            raise UsageError(f"--suppress {path}: not a readable Parquet file "
                             f"({_first_line(exc)})") from None
        if "email" not in frame.columns:
            raise UsageError(f"--suppress {path}: no 'email' column (columns found: "
                             f"{', '.join(frame.columns) or 'none'})")
        if not _is_text(frame.schema["email"]):
            raise UsageError(f"--suppress {path}: column 'email' must be text, "
                             f"found {frame.schema['email']}")
        emails = frame.get_column("email").cast(pl.String)
    else:
        try:
            text = data.getvalue().decode("utf-8-sig")  # -sig: a BOM would glue to line 1
        except UnicodeDecodeError:
            raise UsageError(f"--suppress {path}: neither Parquet nor UTF-8 text") from None
        lines = [ln.strip() for ln in text.splitlines()]
        emails = pl.Series("email", [ln for ln in lines if ln and not ln.startswith("#")],
                           dtype=pl.String)
    return (pl.DataFrame({"_key": emails})
            .select(addresses.trim(pl.col("_key")).str.to_lowercase())
            .filter(pl.col("_key").is_not_null() & (pl.col("_key") != "")).unique())


def header_unsafe(columns: list[str]) -> pl.Expr:
    """The first of `columns` holding a line break (header injection) per row, else null."""
    out = pl.lit(None, pl.String)
    for c in reversed(columns):
        hit = pl.col(c).cast(pl.String).str.contains(HEADER_UNSAFE_POLARS).fill_null(False)
        out = pl.when(hit).then(pl.lit(c)).otherwise(out)
    return out


def _collect(plan: pl.LazyFrame, source: str | None) -> pl.DataFrame:
    """Run the load plan; a file that breaks only now (bad data pages) is a UsageError."""
    try:
        return plan.collect()
    except (Exception, pl.exceptions.PanicException) as exc:  # noqa: BLE001 - polars/arrow errors
        where = f"--input {source}" if source else "--input"
        if source and not storage.is_uri(source):
            for f in _input_files(source):  # the error path only: find the broken file
                try:
                    pl.scan_parquet(f).collect()
                except (Exception, pl.exceptions.PanicException):  # noqa: BLE001
                    where = f"--input {f}"
                    break
        raise UsageError(f"{where}: cannot read the recipients ({_first_line(exc)})") from None


def _check_ids(frame: pl.DataFrame, source: str | None) -> None:
    where = f"--input {source}" if source else "--input"
    bad = frame.filter(pl.col("id").is_null())
    if bad.height:
        raise UsageError(f"{where}: column 'id' has {bad.height:,} empty or out-of-range values "
                         f"(first at row {bad['_row'][0]}); ids must be integers in int64 range")
    if frame["id"].n_unique() == frame.height:  # the usual case, about 10x cheaper than below
        return
    repeated = (frame.group_by("id").agg(pl.col("_row").head(2), pl.col("_norm").n_unique().alias("n"))
                .filter(pl.col("_row").list.len() > 1).sort(pl.col("_row").list.first()))
    if repeated.height:
        row = repeated.row(0, named=True)
        same = "the same address" if row["n"] == 1 else "different addresses"
        raise UsageError(
            f"{where}: column 'id' repeats ({repeated.height:,} ids; e.g. id {row['id']} on rows "
            f"{row['_row'][0]} and {row['_row'][1]}, with {same}); ids must be unique, or drop "
            "the column to number the rows")


def load(lf: pl.LazyFrame, *, done: pl.DataFrame | None = None,
         suppression: pl.DataFrame | None = None,
         header_fields: tuple[str, ...] = ("name",), source: str | None = None) -> Loaded:
    """Give every input row exactly one fate, in one lazy plan collected once.

    Fates, first match wins: `invalid` (bad address, or a line break in a header field),
    `duplicate` (a valid address seen on an earlier row, compared trimmed and with the domain
    lower-cased; `duplicate_of` names the kept row's id), `suppressed`, else to send.
    Order matters for resume: validity, duplicates and suppression are decided over the whole
    input, so a row keeps the same fate on every run; only then are finished ids taken out.
    Columns whose names start with '_' are ignored (reserved for internal columns).
    `source` (the --input path) only names the file in error messages.
    """
    schema = lf.collect_schema()
    user = [c for c in schema.names() if not c.startswith("_")]
    has_id = "id" in schema
    fields = tuple(c for c in user if c not in ("id", "email"))
    plan = lf.select(user).with_row_index("_row").with_columns(
        addresses.trim(pl.col("email").cast(pl.String)).alias("email"),
        # strict=False: an unsigned id beyond int64 becomes null, refused by _check_ids.
        (pl.col("id").cast(pl.Int64, strict=False) if has_id else pl.col("_row").cast(pl.Int64))
        .alias("id"),
    )
    plan = addresses.annotate(plan, "email", reason="_reason", key="_norm")
    # Only text can carry a raw line break: other types render through repr() (escaped).
    unsafe_cols = [c for c in dict.fromkeys(header_fields)
                   if c in fields and _is_text(schema[c]) and schema[c] != pl.Null]
    if unsafe_cols:
        plan = plan.with_columns(_unsafe=header_unsafe(unsafe_cols)).with_columns(
            pl.when(pl.col("_unsafe").is_not_null())
            .then(pl.format("CR, LF or another line break in column '{}' (header injection)",
                            pl.col("_unsafe")))
            .otherwise(pl.col("_reason")).alias("_reason")).drop("_unsafe")
    frame = _collect(plan, source)
    if has_id:
        _check_ids(frame, source)

    valid = pl.col("_reason").is_null()
    first_of = (frame.filter(valid).group_by("_norm", maintain_order=True)
                .agg(pl.col("id").first().alias("_dup_of")))
    frame = frame.join(first_of, on="_norm", how="left", maintain_order="left")
    is_dup = valid & (pl.col("_dup_of") != pl.col("id"))
    status = pl.when(~valid).then(pl.lit(INVALID)).when(is_dup).then(pl.lit(DUPLICATE))
    if suppression is not None and suppression.height:
        status = status.when(pl.col("email").str.to_lowercase().is_in(suppression["_key"].implode())
                             ).then(pl.lit(SUPPRESSED))
    frame = frame.with_columns(
        status.otherwise(pl.lit(None, pl.String)).alias("_status"),
        pl.when(is_dup).then(pl.col("_dup_of")).otherwise(None).alias("_dup_of"),
    )
    input_rows = frame.height
    settled_rows = frame.filter(pl.col("_status").is_not_null())
    counts = {s: int((settled_rows["_status"] == s).sum()) for s in (INVALID, DUPLICATE, SUPPRESSED)}
    settled = settled_rows.select(
        "id", "email", pl.col("_status").alias("status"), pl.lit(0, pl.Int32).alias("attempts"),
        pl.when(pl.col("_status") == INVALID).then(pl.col("_reason"))
        .when(pl.col("_status") == DUPLICATE)
        .then(pl.format("duplicate of id {}", pl.col("_dup_of")))
        .otherwise(pl.lit("address is on the suppression list")).alias("error"),
        pl.col("_dup_of").alias("duplicate_of"),
    )
    to_send = frame.filter(pl.col("_status").is_null()).select("id", "email", *fields)
    loaded = Loaded(to_send=to_send, settled=settled, input_rows=input_rows, already_done=0,
                    counts=counts, fields=fields)
    return skip_done(loaded, done)


def skip_done(loaded: Loaded, done: pl.DataFrame | None) -> Loaded:
    """`loaded` without the ids whose outcome the ledger already holds (the resume anti-join).

    Separate from `load` so that a run can check the whole input before it takes the campaign's
    lease, and read the ledger only once it holds it."""
    if done is None or done.height == 0:
        return loaded
    ids = done.select(pl.col("id").cast(pl.Int64))
    to_send = loaded.to_send.join(ids, on="id", how="anti", maintain_order="left")
    settled = loaded.settled.join(ids, on="id", how="anti", maintain_order="left")
    counts = {s: int((settled["status"] == s).sum()) for s in (INVALID, DUPLICATE, SUPPRESSED)}
    removed = loaded.to_send.height + loaded.settled.height - to_send.height - settled.height
    return Loaded(to_send=to_send, settled=settled, input_rows=loaded.input_rows,
                  already_done=loaded.already_done + removed, counts=counts, fields=loaded.fields)
