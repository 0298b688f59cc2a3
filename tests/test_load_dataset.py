"""The send stage's Dataset of a load in waves (load_dataset.py), mapped by real Ray Data: the
rows of a settled wave reach the map while a later wave still loads, and a read task that
waits for that wave ends when the run is asked to stop, without its rows."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pyarrow as pa
import pytest
import ray

from pipeline import load_dataset

pytestmark = pytest.mark.usefixtures("ray_session")


@ray.remote(num_cpus=0)
class SlowWave:
    """A wave that settles only when told (`settle`), and a run's stop flag (as
    actors.Coordinator.stop_asked)."""

    def __init__(self) -> None:
        self._settled = asyncio.Event()
        self._stop = False
        self._seen: list[int] = []

    async def ok(self) -> bool:
        await self._settled.wait()
        return True

    def settle(self) -> None:
        self._settled.set()

    def ask_stop(self) -> None:
        self._stop = True

    def stop_asked(self) -> bool:
        return self._stop

    def see(self, ids: list[int]) -> None:
        self._seen += ids

    def seen(self) -> list[int]:
        return sorted(self._seen)


def _see(batch: pa.Table, wave: Any) -> pa.Table:
    """The map stage (the send stage's place): tells `wave` which rows reached it."""
    ray.get(wave.see.remote(batch.column("id").to_pylist()))
    return batch


def _run_in_thread(ds: Any) -> tuple[threading.Thread, list[float]]:
    """Run `ds` to its end in a thread; the time it ended."""
    ended: list[float] = []

    def run() -> None:
        for _ in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            pass
        ended.append(time.monotonic())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, ended


def _wait_for(cond: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("stop", [True, False], ids=["stopped", "settled"])
def test_a_read_waiting_for_a_slow_wave_ends_on_a_stop_and_reads_it_once_settled(
        stop: bool) -> None:
    """The first wave reaches the map at once; the second stays unsettled. Asked to stop, the
    read of it ends within a few of its polls and gives none of its rows; left to settle, it
    gives them all (a read that ignored the wave's `ok` would give them early)."""
    wave = SlowWave.remote()  # type: ignore[attr-defined]
    first = pa.table({"id": list(range(100))})
    second = pa.table({"id": list(range(100, 300))})
    parts = [load_dataset.Pending(ok=ray.put(True), rows=ray.put(first), size_bytes=800,
                                  stop=wave),
             load_dataset.Pending(ok=wave.ok.remote(), rows=ray.put(second), size_bytes=1600,
                                  stop=wave)]
    # A task-pool map (the send stage's actors need not start), not fused into the read (its
    # num_cpus differs from READ_TASK_CPUS), as the send stage's map is not.
    ds = load_dataset.dataset_of_waves(parts).map_batches(
        _see, fn_kwargs={"wave": wave}, batch_size=None, batch_format="pyarrow", num_cpus=0.2)
    thread, ended = _run_in_thread(ds)
    seen = lambda: ray.get(wave.seen.remote())  # noqa: E731
    _wait_for(lambda: len(seen()) >= 100, 60)
    time.sleep(3 * load_dataset.WAIT_POLL)  # the second wave's read is waiting by now
    assert thread.is_alive() and seen() == list(range(100))
    asked = time.monotonic()
    ray.get(wave.ask_stop.remote() if stop else wave.settle.remote())
    thread.join(30)
    assert not thread.is_alive(), "the read did not end"
    # A stop is seen at the read's next poll (WAIT_POLL, 0.5 s); 10 s leaves room for load.
    assert ended[0] - asked < 10
    assert seen() == (list(range(100)) if stop else list(range(300)))
    ray.kill(wave)
