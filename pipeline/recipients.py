"""Recipients: generate them, load them lazily with polars, and settle every row's fate at load.

Plain functions over polars frames; nothing here knows about Ray.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from . import addresses, storage
from .errors import UsageError
from .ledger import DUPLICATE, INVALID, SUPPRESSED

INTERNAL = ("_row", "_norm", "_status", "_reason", "_dup_of")  # input columns named _* are ignored
_FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Linus", "Guido",
          "Ken", "Dennis", "Frances", "Radia", "Niklaus", "Leslie", "Sophie", "Zoë", "José",
          "Björn", "Ngozi", "Priya", "Wei", "Yuki", "Olúwa"]
_LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Hamilton", "Torvalds",
         "van Rossum", "Thompson", "Ritchie", "Allen", "Perlman", "Wirth", "Lamport", "Wilson",
         "Müller", "García", "Øster", "Okafor", "Sharma", "Zhang", "Tanaka", "Adé"]
_CITIES = ["Lisbon", "Lagos", "Lima", "Leeds", "Lyon", "Łódź", "Linz", "Ljubljana", "Lahore",
           "Luanda", "Lund", "Lucknow"]
_PLANS = ["free", "pro", "team", "enterprise"]
_DOMAINS = ["example.com", "example.org", "example.net", "mail.example", "post.example"]


# --------------------------------------------------------------------------- generate

# Kinds of bad address the generator plants, one reason class each (see addresses.py).
BAD_ADDRESSES: list[str | None] = [
    "", None, "no-at-sign.example.com", "two@@example.com", "sp ace@example.com",
    "new\nline@example.com", "x@example.com\r\nBcc: victim@example.com", "dot.@example.com",
    "x@nodot", "a" * 65 + "@example.com", "x@" + "d" * 64 + ".com", "x@-bad-.com",
    "zero\u200bwidth@example.com", "x@[192.0.2.1]", "x@exa_mple.com"]
# Names that would add a header if they reached one unchecked (CR, LF, and the separators
# Python's str.splitlines() also breaks on).
INJECTION_NAMES = ["Eve\r\nBcc: victim@example.com", "Mallory\nX-Injected: yes",
                   "Trudy\rSubject: spoofed", "Zed\u2028Bcc: victim@example.com",
                   "Oscar\x0bReply-To: victim@example.com"]
# Valid internationalised / unusual addresses (RFC 6531, quoted local parts): {} is the row id.
INTL_ADDRESSES = ["zoë.{}@bücher.example", "用户{}@例子.测试", '"first last {}"@example.com',
                  "josé+{}@correo.example", "δοκιμή{}@παράδειγμα.δοκιμή", "{}😀@emoji.example",
                  '"at@sign {}"@example.org', "o'neil.{}@xn--bcher-kva.example"]
# Names that are fine but unusual: emoji, non-Latin scripts, very long, null.
INTL_NAMES: list[str | None] = ["Zoë 😀 Ünïcødé", "山田 太郎", "Ωmega " * 60, None, "Ngọc Ánh"]
PLANTED = ("clean", "invalid", "duplicate", "injection", "intl")


def generate(rows: int, *, seed: int = 0, invalid_fraction: float = 0.0,
             duplicate_fraction: float = 0.0, injection_fraction: float = 0.0,
             intl_fraction: float = 0.0, label: bool = False) -> pl.DataFrame:
    """`rows` synthetic recipients (id, email, name, city, plan, signup_year); 1M in about 1 s.

    Mixed in, each over its own randomly chosen rows (row 0 always stays clean):
    - `invalid_fraction`: a bad address (BAD_ADDRESSES, cycled);
    - `duplicate_fraction`: an earlier clean row's address with its domain upper-cased (every
      other one also padded with spaces), which must still count as the same address;
    - `injection_fraction`: a valid address but a name holding CR/LF (INJECTION_NAMES);
    - `intl_fraction`: a valid internationalised or quoted address and an unusual name.
    `label=True` adds `planted` (the kind above, or "clean") and `planted_of` (for a duplicate,
    the id of the row it repeats): what a load must conclude, for tests and demos.
    """
    fractions = (("--invalid-fraction", invalid_fraction),
                 ("--duplicate-fraction", duplicate_fraction),
                 ("--injection-fraction", injection_fraction), ("--intl-fraction", intl_fraction))
    for flag, value in fractions:
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"{flag} must be within [0, 1], got {value}")
    if sum(v for _, v in fractions) > 1.0:
        raise UsageError("the --*-fraction flags together must not exceed 1")
    if rows < 0:
        raise UsageError(f"--rows must not be negative, got {rows}")
    rng = np.random.default_rng(seed)
    first = rng.integers(0, len(_FIRST), rows)
    last = rng.integers(0, len(_LAST), rows)
    idx = np.arange(rows, dtype=np.int64)
    df = pl.DataFrame({
        "id": idx,
        "first": pl.Series(_FIRST, dtype=pl.String).gather(first),
        "last": pl.Series(_LAST, dtype=pl.String).gather(last),
        "domain": pl.Series(_DOMAINS, dtype=pl.String).gather(rng.integers(0, len(_DOMAINS), rows)),
        "city": pl.Series(_CITIES, dtype=pl.String).gather(rng.integers(0, len(_CITIES), rows)),
        "plan": pl.Series(_PLANS, dtype=pl.String).gather(rng.integers(0, len(_PLANS), rows)),
        "signup_year": rng.integers(2010, 2027, rows).astype(np.int16),
    })
    df = df.with_columns(
        email=pl.concat_str([pl.lit("user"), pl.col("id").cast(pl.String), pl.lit("@"), pl.col("domain")]),
        name=pl.concat_str([pl.col("first"), pl.lit(" "), pl.col("last")]),
    ).select("id", "email", "name", "city", "plan", "signup_year")
    # Row 0 is never chosen, so every duplicate has an earlier clean row to repeat.
    room = max(rows - 1, 0)
    counts = [min(int(rows * f), room) for _, f in fractions]
    planted = np.zeros(rows, dtype=np.int8)  # index into PLANTED
    planted_of = np.full(rows, -1, dtype=np.int64)
    if any(counts):
        chosen = rng.permutation(np.arange(1, rows, dtype=np.int64))
        emails = df["email"].to_numpy().astype(object)
        names = df["name"].to_numpy().astype(object)
        bounds = np.cumsum([0, *counts])
        bad, dup, inj, intl = (np.sort(chosen[bounds[i]:bounds[i + 1]]) for i in range(4))
        planted[bad], planted[dup], planted[inj], planted[intl] = 1, 2, 3, 4
        emails[bad] = [BAD_ADDRESSES[i % len(BAD_ADDRESSES)] for i in range(bad.size)]
        names[inj] = [INJECTION_NAMES[i % len(INJECTION_NAMES)] for i in range(inj.size)]
        emails[intl] = [INTL_ADDRESSES[i % len(INTL_ADDRESSES)].format(r)
                        for i, r in enumerate(intl.tolist())]
        names[intl] = [INTL_NAMES[i % len(INTL_NAMES)] for i in range(intl.size)]
        if dup.size:
            clean = idx[planted == 0]
            sources = clean[np.searchsorted(clean, dup) - 1]  # the last clean row before
            planted_of[dup] = sources
            for n, (row, src) in enumerate(zip(dup.tolist(), sources.tolist(), strict=True)):
                local, _, domain = str(emails[src]).rpartition("@")
                emails[row] = f"{local}@{domain.upper()}" if n % 2 else f"  {local}@{domain.upper()} "
        df = df.with_columns(email=pl.Series(emails.tolist(), dtype=pl.String),
                             name=pl.Series(names.tolist(), dtype=pl.String))
    if label:
        df = df.with_columns(
            planted=pl.Series(PLANTED, dtype=pl.String).gather(planted),
            planted_of=pl.when(pl.lit(pl.Series(planted_of)) >= 0).then(pl.lit(pl.Series(planted_of))))
    return df


def default_input(data_dir: str, rows: int, seed: int = 0) -> str:
    """The embedded default: a generated file, made once and cached under `data_dir`."""
    path = os.path.join(data_dir, f"recipients-{rows}.parquet")
    if not os.path.exists(path):
        os.makedirs(data_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        generate(rows, seed=seed).write_parquet(tmp)
        os.replace(tmp, path)
    return path


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


# C0 controls but tab, DEL, C1 controls (NEL among them) and the Unicode line and paragraph
# separators: all of these end a line for str.splitlines(), so any could start a new header.
_HEADER_BREAK = r"[\x00-\x08\x0A-\x1F\x7F-\x9F\x{2028}\x{2029}]"


def header_unsafe(columns: list[str]) -> pl.Expr:
    """The first of `columns` holding a line break (header injection) per row, else null."""
    out = pl.lit(None, pl.String)
    for c in reversed(columns):
        hit = pl.col(c).cast(pl.String).str.contains(_HEADER_BREAK).fill_null(False)
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
    already_done = 0
    if done is not None and done.height:
        before = frame.height
        frame = frame.join(done.select(pl.col("id").cast(pl.Int64)), on="id", how="anti",
                           maintain_order="left")
        already_done = before - frame.height

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
    return Loaded(to_send=to_send, settled=settled, input_rows=input_rows,
                  already_done=already_done, counts=counts, fields=fields)
