"""Recipients: find and check the input files (footers and schemas only), cut them into row
groups for the load's tasks, read one row group, and read the suppression list.

Plain functions over polars and pyarrow; nothing here knows about Ray. The rules that settle
each row's fate are in partitions.py.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from . import addresses, storage
from .errors import UsageError

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


def is_text(dtype: pl.DataType) -> bool:
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
    if not is_text(schema["email"]):
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
class Unit:
    """One row group of one input file: what one read in a load task takes."""

    file: str
    row_group: int
    first_row: int  # its first row's place in the whole input (files in order)
    rows: int


def _parquet_file(f: str) -> Any:
    import pyarrow.parquet as pq
    if storage.is_uri(f):
        fs, p = storage.resolve(f)
        return pq.ParquetFile(fs.open_input_file(p))
    return pq.ParquetFile(f)


def units(path: str) -> list[Unit]:
    """The input's row groups, from the Parquet footers only (the driver reads no rows). Their
    files are named as load tasks find them wherever they run (absolute local paths)."""
    out: list[Unit] = []
    first = 0
    for f in _input_files(path):
        try:
            meta = _parquet_file(f).metadata
        except Exception as exc:  # noqa: BLE001 - scan() has read the same footer already
            raise UsageError(f"--input {f}: not a readable Parquet file ({_first_line(exc)})") from None
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            if rows:
                out.append(Unit(file=storage.absolute(f), row_group=g, first_row=first, rows=rows))
            first += rows
    return out


def waves(units: Sequence[Unit], first: int) -> list[list[Unit]]:
    """The input's row groups in order, cut into waves: the first of at least `first` rows,
    each next one of at least twice the one before (20M rows: 1, 2, 4, 8, 5M); `first` 0:
    one wave. Twice: the driver tracks a few waves, and each wave settles while the one before
    it sends, which takes longer the more rows it has."""
    if first <= 0:
        return [list(units)]
    out: list[list[Unit]] = [[]]
    rows, target = 0, first
    for unit in units:
        if rows >= target:
            out.append([])
            rows, target = 0, target * 2
        out[-1].append(unit)
        rows += unit.rows
    return out


def read_unit(unit: Unit, columns: Sequence[str] | None = None) -> pl.DataFrame:
    """One row group's rows (its user columns, or only `columns`); a broken data page is a
    UsageError naming the file."""
    try:
        table = _parquet_file(unit.file).read_row_group(
            unit.row_group, columns=list(columns) if columns is not None else None)
        frame = pl.from_arrow(table)
    except (Exception, pl.exceptions.PanicException) as exc:  # noqa: BLE001 - arrow/polars errors
        raise UsageError(f"--input {unit.file}: cannot read the recipients "
                         f"({_first_line(exc)})") from None
    assert isinstance(frame, pl.DataFrame)
    return frame.select([c for c in frame.columns if not c.startswith("_")])


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
        if not is_text(frame.schema["email"]):
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
