"""The load as a test drives it: a frame written to Parquet (several row groups), settled by the
real load stage on the session's Ray across several partitions, its outputs fetched back in
input order. What the old single-frame `recipients.load` returned, from the distributed path."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from pipeline import load_stage, partitions, recipients


@dataclass(frozen=True, kw_only=True)
class Loaded:
    to_send: pl.DataFrame  # id, email, template fields (input order)
    settled: pl.DataFrame  # ledger rows settled at load (input order)
    input_rows: int
    already_done: int
    counts: dict[str, int] = field(default_factory=dict)
    fields: tuple[str, ...] = ()
    stage: load_stage.Loaded | None = None


def _fetch(refs: list, sizes: tuple[int, ...] | None = None) -> pl.DataFrame:
    import ray
    frames = [pl.from_arrow(ray.get(r)) for r, n in zip(refs, sizes or [1] * len(refs), strict=True)
              if n]
    frames = [f for f in frames if f.width]  # a wave's partition without rows
    if not frames:
        return pl.DataFrame()
    return pl.concat(frames, how="vertical_relaxed").sort("_row")


def load(data: pl.DataFrame | pl.LazyFrame | str | Path, *,
         suppression: pl.DataFrame | None = None, header_fields: tuple[str, ...] = ("name",),
         source: str | None = None, parts: int = 3, row_group_size: int | None = None,
         resume_from: str | None = None, retry_failed: bool = False,
         block_rows: int = 97, wave_rows: int = 0, reserved_cpus: float = 0.0) -> Loaded:
    """Needs the session's Ray (the `ray_session` fixture)."""
    folder = None
    if isinstance(data, (pl.DataFrame, pl.LazyFrame)):
        frame = data.collect() if isinstance(data, pl.LazyFrame) else data
        folder = tempfile.mkdtemp(prefix="bulkmail-load-")
        path = str(Path(folder) / "in.parquet")
        size = row_group_size or max(1, (frame.height + 3) // 4)  # four row groups or so
        frame.write_parquet(path, row_group_size=size)
    else:
        path = str(data)
    try:
        schema = recipients.scan(path).collect_schema()
        rules = partitions.Rules(schema=partitions.user_schema(schema),
                                 header_fields=header_fields, partitions=parts)
        out = load_stage.load(recipients.units(path), rules=rules, source=source or path,
                              suppression=suppression, resume_from=resume_from,
                              retry_failed=retry_failed, block_rows=block_rows,
                              wave_rows=wave_rows, reserved_cpus=reserved_cpus)
        if out.waves:  # the later waves read the file while the first one would send
            s, error = load_stage.finish(out)
            assert error is None, error
    finally:
        if folder is not None:  # the rows loaded are in Ray's object store by now
            shutil.rmtree(folder, ignore_errors=True)
    if out.waves:  # every wave's rows, the whole load's counts
        to_send = _fetch([r for w in out.waves for r in w.to_send])
        settled = _fetch([r for w in out.waves for r in w.settled])
    else:
        s = out.summary
        to_send = _fetch(out.to_send)
        settled = _fetch(out.settled, s.settled_sizes)
    return Loaded(
        to_send=to_send.drop("_part", "_row") if to_send.width else
        pl.DataFrame(schema={"id": pl.Int64, "email": pl.String}),
        settled=settled.drop("_part", "_row") if settled.width else
        pl.DataFrame(schema={"id": pl.Int64, "email": pl.String, "status": pl.String,
                             "error": pl.String, "duplicate_of": pl.Int64}),
        input_rows=s.input_rows, already_done=s.already_done, counts=s.counts, fields=s.fields,
        stage=out)
