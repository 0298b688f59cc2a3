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

INTERNAL = ("_row", "_norm", "_status", "_reason", "_dup_of")
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
# Kinds of bad address the generator plants, one reason class each (see addresses.py).
BAD_ADDRESSES = ["", "no-at-sign.example.com", "two@@example.com", "sp ace@example.com",
                 "new\nline@example.com", "dot.@example.com", "x@nodot", "a" * 65 + "@example.com",
                 "x@" + "d" * 64 + ".com", "x@-bad-.com"]


# --------------------------------------------------------------------------- generate

def generate(rows: int, *, seed: int = 0, invalid_fraction: float = 0.0,
             duplicate_fraction: float = 0.0) -> pl.DataFrame:
    """`rows` synthetic recipients (id, email, name, city, plan, signup_year); 1M in about 1 s.

    `invalid_fraction` of the rows get a bad address and `duplicate_fraction` repeat an earlier
    row's address (with its domain upper-cased, which must still count as the same address).
    """
    for flag, value in (("--invalid-fraction", invalid_fraction),
                        ("--duplicate-fraction", duplicate_fraction)):
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"{flag} must be within [0, 1], got {value}")
    if invalid_fraction + duplicate_fraction > 1.0:
        raise UsageError("--invalid-fraction plus --duplicate-fraction must not exceed 1")
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
    n_bad = int(rows * invalid_fraction)
    n_dup = int(rows * duplicate_fraction)
    if n_bad or n_dup:
        chosen = rng.permutation(rows)
        emails = df["email"].to_numpy().astype(object)
        bad_rows = chosen[:n_bad]
        emails[bad_rows] = [BAD_ADDRESSES[i % len(BAD_ADDRESSES)] for i in range(n_bad)]
        dup_rows = np.sort(chosen[n_bad:n_bad + n_dup])
        clean = np.setdiff1d(idx, np.concatenate([bad_rows, dup_rows]))
        if n_dup and clean.size:
            # Each duplicate repeats an earlier clean row (or the first clean row).
            pos = np.searchsorted(clean, dup_rows) - 1
            sources = clean[np.clip(pos, 0, None)]
            for row, src in zip(dup_rows.tolist(), sources.tolist(), strict=True):
                local, _, domain = str(emails[src]).rpartition("@")
                emails[row] = f"{local}@{domain.upper()}"
        df = df.with_columns(email=pl.Series(emails.tolist(), dtype=pl.String))
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


def scan(path: str) -> pl.LazyFrame:
    """A lazy frame over the input, with its schema checked (reads only the Parquet footers)."""
    files = _input_files(path)
    frames = []
    for f in files:
        try:
            if storage.is_uri(f):
                import pyarrow.parquet as pq
                fs, p = storage.resolve(f)
                lf = pl.scan_pyarrow_dataset(
                    __import__("pyarrow.dataset", fromlist=["dataset"]).dataset(
                        p, filesystem=fs, format="parquet"))
                pq.read_schema(p, filesystem=fs)  # fail here on a broken footer
            else:
                lf = pl.scan_parquet(f)
            schema = lf.collect_schema()
        except Exception as exc:  # noqa: BLE001 - polars raises several types for a bad file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"--input {f}: not a readable Parquet file ({first[:160]})") from None
        if "email" not in schema:
            found = ", ".join(schema.names()) or "none"
            raise UsageError(f"--input {f}: no 'email' column (columns found: {found})")
        if schema["email"] not in (pl.String, pl.Categorical, pl.Null) and not isinstance(
                schema["email"], pl.Enum):
            raise UsageError(f"--input {f}: column 'email' must be text, found {schema['email']}")
        if "id" in schema and not schema["id"].is_integer():
            raise UsageError(f"--input {f}: column 'id' must be an integer, found {schema['id']}")
        frames.append(lf)
    if len(frames) == 1:
        return frames[0]
    return pl.concat(frames, how="diagonal_relaxed")


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
    """Addresses never to mail, lower-cased: Parquet (an `email` column) or text, one a line."""
    if not storage.exists(path):
        raise UsageError(f"--suppress {path}: no such file")
    if storage.is_dir(path):
        raise UsageError(f"--suppress {path}: is a directory, expected a file")
    head = storage.open_bytes(path).read(4)
    if head == b"PAR1":
        try:
            frame = pl.read_parquet(storage.open_bytes(path))
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"--suppress {path}: not a readable Parquet file ({exc})") from None
        if "email" not in frame.columns:
            raise UsageError(f"--suppress {path}: no 'email' column (columns found: "
                             f"{', '.join(frame.columns) or 'none'})")
        emails = frame.get_column("email").cast(pl.String)
    else:
        try:
            text = storage.read_text(path)
        except UnicodeDecodeError:
            raise UsageError(f"--suppress {path}: neither Parquet nor UTF-8 text") from None
        lines = [ln.strip() for ln in text.splitlines()]
        emails = pl.Series("email", [ln for ln in lines if ln and not ln.startswith("#")],
                           dtype=pl.String)
    return (pl.DataFrame({"_key": emails.str.strip_chars().str.to_lowercase()})
            .drop_nulls().unique())


def header_unsafe(columns: list[str]) -> pl.Expr:
    """True where any value that can reach a header holds CR or LF (header injection)."""
    checks = [pl.col(c).cast(pl.String).str.contains(r"[\r\n]").fill_null(False) for c in columns]
    return pl.any_horizontal(checks) if checks else pl.lit(False)


def load(lf: pl.LazyFrame, *, done: pl.DataFrame | None = None,
         suppression: pl.DataFrame | None = None,
         header_fields: tuple[str, ...] = ("name",)) -> Loaded:
    """Give every input row exactly one fate, in one lazy plan collected once.

    Order matters for resume: validity, duplicates and suppression are decided over the whole
    input, so a row keeps the same fate on every run; only then are finished ids taken out.
    """
    schema = lf.collect_schema()
    has_id = "id" in schema
    fields = tuple(c for c in schema.names() if c not in ("id", "email") and not c.startswith("_"))
    plan = lf.with_row_index("_row").with_columns(
        pl.col("email").cast(pl.String).str.strip_chars(" \t").alias("email"),
        (pl.col("id").cast(pl.Int64) if has_id else pl.col("_row").cast(pl.Int64)).alias("id"),
    )
    unsafe_cols = [c for c in header_fields if c in schema]
    plan = plan.with_columns(
        pl.when(header_unsafe(unsafe_cols))
        .then(pl.lit("CR or LF in a header field (header injection)"))
        .otherwise(addresses.invalid_reason(pl.col("email"))).alias("_reason"),
        addresses.normalise(pl.col("email")).alias("_norm"),
    )
    frame = plan.collect()

    if has_id:
        clash = (frame.group_by("id").agg(pl.col("_norm").n_unique().alias("n"),
                                          pl.col("_norm").first().alias("a"),
                                          pl.col("_norm").last().alias("b"))
                 .filter(pl.col("n") > 1))
        if clash.height:
            row = clash.row(0, named=True)
            raise UsageError(
                f"--input: column 'id' repeats with different addresses ({clash.height} ids, "
                f"e.g. id {row['id']}: {row['a']!r} and {row['b']!r}); ids must be unique"
            )
        # The same (id, address) twice is one recipient listed twice: keep the first row.
        frame = frame.unique(subset="id", keep="first", maintain_order=True)

    valid = pl.col("_reason").is_null()
    first_of = (frame.filter(valid).group_by("_norm", maintain_order=True)
                .agg(pl.col("id").first().alias("_dup_of")))
    frame = frame.join(first_of, on="_norm", how="left", maintain_order="left")
    is_dup = valid & (pl.col("_dup_of") != pl.col("id"))
    status = pl.when(~valid).then(pl.lit(INVALID)).when(is_dup).then(pl.lit(DUPLICATE))
    if suppression is not None and suppression.height:
        frame = frame.with_columns(
            pl.col("email").str.to_lowercase().is_in(suppression["_key"].implode()).alias("_supp"))
        status = status.when(pl.col("_supp")).then(pl.lit(SUPPRESSED))
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
