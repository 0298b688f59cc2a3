"""PNG charts for a run's report (placeholder until issue 6 lands)."""

from __future__ import annotations

from typing import Any

import polars as pl


def write_charts(rep: dict[str, Any], this_run: pl.DataFrame, run_dir: str) -> list[str]:
    return []
