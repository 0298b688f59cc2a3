"""What address validation costs at load time: vectorised polars (used) vs email-validator.

    python scripts/bench_validation.py               # 1M rows, email-validator on 20,000 of them
    python scripts/bench_validation.py --rows 200000 --sample 5000 --json out.json

Measures, on a generated list with 2% bad addresses, 2% duplicates and 2% internationalised
or quoted ones:
1. the polars checks alone (`addresses.annotate`: reason + dedupe key) on the frame in memory;
2. the load's rules over the whole list in one process (`partitions.validate` of every row
   group read from Parquet, then `partitions.settle` as one partition), and the same with the
   checks swapped for a bare lower-cased key, so the difference is what validation adds;
3. `email_validator.validate_email(..., check_deliverability=False)` on a sample, projected to
   all rows on one core (it is pure Python: a process pool would at best divide by the cores);
4. how often the two disagree on the sample, with an example of each kind of disagreement.
Wall times are the best of --repeat runs (the machine is shared); CPU is process CPU (polars
uses every core).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import polars as pl  # noqa: E402

from pipeline import addresses, generate, partitions, recipients  # noqa: E402


def _load(path: str) -> partitions.Settled:
    """The load's rules in this process, one partition (what a task does, all at once)."""
    rules = partitions.Rules(schema=partitions.user_schema(recipients.scan(path).collect_schema()))
    blocks = [partitions.validate(recipients.read_unit(u), rules=rules, first_row=u.first_row)
              for u in recipients.units(path)]
    return partitions.settle(blocks, fields=rules.fields)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def best_of(repeat: int, fn: Callable[[], object]) -> tuple[float, float]:
    """(best wall seconds, CPU seconds of that run)."""
    best = (float("inf"), 0.0)
    for _ in range(repeat):
        c0, t0 = _cpu(), time.perf_counter()
        fn()
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        if wall < best[0]:
            best = (wall, cpu)
    return best


def _bare_annotate(frame: pl.LazyFrame, email: str, *, reason: str, key: str) -> pl.LazyFrame:
    # The least a load needs without validation: a dedupe key.
    return frame.with_columns(pl.lit(None, pl.String).alias(reason),
                              pl.col(email).str.to_lowercase().alias(key))


def email_validator_reasons(sample: list[str | None]) -> tuple[list[str | None], float, float]:
    """Its verdict per address, wall seconds and CPU seconds for the whole sample."""
    from email_validator import EmailNotValidError, validate_email
    out: list[str | None] = []
    c0, t0 = _cpu(), time.perf_counter()
    for address in sample:
        try:
            validate_email(address or "", check_deliverability=False, allow_quoted_local=True)
            out.append(None)
        except EmailNotValidError as exc:
            out.append(str(exc))
    return out, time.perf_counter() - t0, _cpu() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--sample", type=int, default=20_000, help="addresses given to email-validator")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write the numbers here")
    a = ap.parse_args()

    frame = generate.generate(a.rows, seed=1, invalid_fraction=0.02, duplicate_fraction=0.02,
                                intl_fraction=0.02)
    trimmed = frame.lazy().with_columns(addresses.trim(pl.col("email")).alias("email"))
    res: dict[str, Any] = {"rows": a.rows, "cores": os.cpu_count(), "polars": pl.__version__}

    wall, cpu = best_of(a.repeat, lambda: addresses.annotate(
        trimmed, "email", reason="r", key="k").collect())
    res["polars_checks_s"] = {"wall": round(wall, 3), "cpu": round(cpu, 3)}

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "in.parquet")
        frame.write_parquet(path)
        wall, cpu = best_of(a.repeat, lambda: _load(path))
        res["load_s"] = {"wall": round(wall, 3), "cpu": round(cpu, 3)}
        real = addresses.annotate
        addresses.annotate = _bare_annotate
        try:
            wall, cpu = best_of(a.repeat, lambda: _load(path))
        finally:
            addresses.annotate = real
        res["load_without_validation_s"] = {"wall": round(wall, 3), "cpu": round(cpu, 3)}
    res["validation_adds_to_load_s"] = round(
        res["load_s"]["wall"] - res["load_without_validation_s"]["wall"], 3)

    sample_frame = frame.sample(min(a.sample, a.rows), seed=2)
    sample = sample_frame["email"].str.strip_chars(" ").to_list()
    ours = sample_frame.select(addresses.invalid_reason(
        addresses.trim(pl.col("email")))).to_series().to_list()
    theirs, wall, cpu = email_validator_reasons(sample)
    n = max(len(sample), 1)
    res["email_validator"] = {
        "sample": len(sample), "us_per_address": {"wall": round(wall / n * 1e6, 1),
                                                  "cpu": round(cpu / n * 1e6, 1)},
        "projected_s_all_rows_one_core": {"wall": round(wall / n * a.rows, 1),
                                          "cpu": round(cpu / n * a.rows, 1)}}
    kinds: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for address, mine, other in zip(sample, ours, theirs, strict=True):
        if (mine is None) != (other is None):
            kind = ("we refuse, email-validator accepts" if other is None
                    else "we accept, email-validator refuses")
            kinds[kind] += 1
            examples.setdefault(kind, f"{address!r}: {mine or other}")
    res["disagreements"] = {"count": sum(kinds.values()), "kinds": dict(kinds),
                            "examples": examples}

    print(json.dumps(res, indent=2, ensure_ascii=False))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2, ensure_ascii=False)


if __name__ == "__main__":
    main()
