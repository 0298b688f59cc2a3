"""The load's rules as one plain polars computation over the whole list at once: the oracle the
distributed load (load_stage.py over partitions.py) is checked against. It is the single-frame
load bulkmail ran on the driver before the load moved onto the cluster, kept here unchanged in
its rules so that a fate that drifts shows as a difference."""

from __future__ import annotations

import polars as pl

from pipeline import addresses
from pipeline.ledger import DUPLICATE, INVALID, SUPPRESSED
from pipeline.messages import HEADER_UNSAFE_POLARS


def _unsafe(columns: list[str]) -> pl.Expr:
    out = pl.lit(None, pl.String)
    for c in reversed(columns):
        hit = pl.col(c).cast(pl.String).str.contains(HEADER_UNSAFE_POLARS).fill_null(False)
        out = pl.when(hit).then(pl.lit(c)).otherwise(out)
    return out


def fates(frame: pl.DataFrame, *, suppression: pl.DataFrame | None = None,
          header_fields: tuple[str, ...] = ("name",)) -> pl.DataFrame:
    """One row per input row, in input order: id, status (null: to send), error, duplicate_of."""
    has_id = "id" in frame.columns
    fields = [c for c in frame.columns if c not in ("id", "email") and not c.startswith("_")]
    lf = frame.lazy().with_row_index("_row").with_columns(
        addresses.trim(pl.col("email").cast(pl.String)).alias("email"),
        (pl.col("id").cast(pl.Int64, strict=False) if has_id else pl.col("_row").cast(pl.Int64))
        .alias("id"))
    lf = addresses.annotate(lf, "email", reason="_reason", key="_norm")
    unsafe = [c for c in dict.fromkeys(header_fields)
              if c in fields and frame.schema[c] in (pl.String, pl.Categorical)]
    if unsafe:
        lf = lf.with_columns(_unsafe=_unsafe(unsafe)).with_columns(
            pl.when(pl.col("_unsafe").is_not_null())
            .then(pl.format("CR, LF or another line break in column '{}' (header injection)",
                            pl.col("_unsafe")))
            .otherwise(pl.col("_reason")).alias("_reason")).drop("_unsafe")
    df = lf.collect()
    valid = pl.col("_reason").is_null()
    first_of = (df.filter(valid).group_by("_norm", maintain_order=True)
                .agg(pl.col("id").first().alias("_dup_of")))
    df = df.join(first_of, on="_norm", how="left", maintain_order="left")
    is_dup = valid & (pl.col("_dup_of") != pl.col("id"))
    status = pl.when(~valid).then(pl.lit(INVALID)).when(is_dup).then(pl.lit(DUPLICATE))
    if suppression is not None and suppression.height:
        status = status.when(pl.col("email").str.to_lowercase().is_in(suppression["_key"].implode())
                             ).then(pl.lit(SUPPRESSED))
    df = df.with_columns(status.otherwise(pl.lit(None, pl.String)).alias("status"),
                         pl.when(is_dup).then(pl.col("_dup_of")).otherwise(None).alias("duplicate_of"))
    return df.select(
        "id", "status",
        pl.when(pl.col("status") == INVALID).then(pl.col("_reason"))
        .when(pl.col("status") == DUPLICATE).then(pl.format("duplicate of id {}", pl.col("duplicate_of")))
        .when(pl.col("status") == SUPPRESSED).then(pl.lit("address is on the suppression list"))
        .otherwise(None).alias("error"),
        "duplicate_of")
