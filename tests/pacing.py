"""What a rate limit promises, as the rate tests check it on send start times (seconds)."""

from __future__ import annotations

import polars as pl


def all_sending(led: pl.DataFrame) -> float:
    """When the last sender actor of a run started its first email (ledger `started_at`).

    Before that, actor processes are still starting: on 2 cores one takes ~1 s of CPU and
    starves the senders already running, and slots that come due meanwhile are dropped, never
    spent late (that would overshoot the next second). Seen once in CI, counting from the first
    email: [85, 100, 100, 100, 100, 99, 101, 100] at 100/s, while Ray started 10 workers."""
    firsts = led.group_by("actor").agg(pl.col("started_at").min())["started_at"]
    return max(t.timestamp() for t in firsts.to_list())


def per_second(times: list[float], *, since: float | None = None) -> list[int]:
    """Counts in each full second from `since` (default: the first time) to the last time,
    leaving out the first second (the senders are still reaching their pace) and the last,
    partial one."""
    times = sorted(times)
    t0 = times[0] if since is None else since
    full = int(times[-1] - t0)
    return [sum(1 for t in times if t0 + i <= t < t0 + i + 1) for i in range(1, full)]


def check_paced(times: list[float], rate: float, *, since: float | None = None) -> list[int]:
    """Within 10% of the rate in every full second: the limit holds in every second from the
    first send on (10% covers the limiter's 50 ms of late slots and the rounding of windows),
    and the rate is reached in every second from `since` on. Returns the latter."""
    every = per_second(times)
    assert every and max(every) <= rate * 1.1, f"over the limit: per-second counts {every}"
    windows = per_second(times, since=since) if since is not None else every
    assert windows and all(w >= rate * 0.9 for w in windows), f"per-second counts {windows}"
    return windows
