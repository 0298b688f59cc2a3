"""The run's Coordinator actor on the session's Ray: the sender actors' start together."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("ray_session")


def coordinator(valid_until: float | None = None) -> Any:
    from pipeline.actors import Coordinator
    return Coordinator.remote(valid_until)  # type: ignore[attr-defined]


def still_waiting(ref: Any, seconds: float = 0.5) -> bool:
    import ray
    ready, _ = ray.wait([ref], timeout=seconds)
    return not ready


def wait_released_by_the_last(first: list[str], last: str, pool: int) -> Any:
    """Senders `first` register; a wait for the pool blocks until `last` registers too, then
    returns how many are up. The coordinator, for more checks."""
    import ray
    c = coordinator()
    ray.get([c.sender_up.remote(name, pool) for name in first])
    waiting = c.wait_for_pool.remote(60)
    assert still_waiting(waiting)
    ray.get(c.sender_up.remote(last, pool))
    assert ray.get(waiting, timeout=10) == pool
    return c


def test_the_first_senders_up_wait_until_the_whole_pool_is() -> None:
    wait_released_by_the_last(["a", "b"], "c", pool=3)


def test_a_restarted_sender_does_not_stand_in_for_one_not_up_yet() -> None:
    # A sender actor restarted after its process died keeps its actor id, hence its name.
    import ray
    c = wait_released_by_the_last(["a", "a"], "b", pool=2)
    assert ray.get(c.wait_for_pool.remote(60), timeout=10) == 2  # up: no wait any more


def test_the_wait_ends_at_its_bound_counted_from_the_first_actor_up() -> None:
    # A cluster still adding nodes for the rest: the actors up send without them.
    import ray
    c = coordinator()
    ray.get(c.sender_up.remote("a", 4))
    time.sleep(3.0)
    t0 = time.monotonic()
    assert ray.get(c.wait_for_pool.remote(4.0), timeout=30) == 1
    assert time.monotonic() - t0 < 3.0  # the bound ends 4 s after the first one up, not the call
    t0 = time.monotonic()
    assert ray.get(c.wait_for_pool.remote(4.0), timeout=30) == 1
    assert time.monotonic() - t0 < 3.0  # past the bound, a later call returns at once


def test_a_stop_ends_the_wait_and_the_batch_then_does_not_start() -> None:
    import ray

    from pipeline.actors import NOT_STARTED
    c = coordinator()
    ray.get(c.sender_up.remote("a", 2))
    waiting = c.wait_for_pool.remote(600)
    assert still_waiting(waiting)
    ray.get(c.stop.remote())
    assert ray.get(waiting, timeout=10) == 1
    assert ray.get(c.begin_batch.remote("0:9:10")) == NOT_STARTED


def test_a_lease_already_run_out_ends_the_wait_at_once() -> None:
    import ray
    c = coordinator(valid_until=time.time() - 1)
    ray.get(c.sender_up.remote("a", 2))
    assert ray.get(c.wait_for_pool.remote(600), timeout=10) == 1


def test_a_renewal_that_arrives_late_does_not_move_the_deadline_back() -> None:
    import ray
    c = coordinator(valid_until=time.time() + 600)
    ray.get(c.extend.remote(time.time() + 1200))
    ray.get(c.extend.remote(time.time() - 5))  # an older renewal, run after the newer one
    assert ray.get(c.is_stopping.remote()) is False


def test_sender_batches_register_and_wait_for_each_other(tmp_path: Path) -> None:
    # The UDF itself (built here, in the driver, as Ray Data builds it in each pool actor):
    # both register under names of their own, and the first one's wait ends with the second.
    # A threads-mode actor lengthens its process's GIL switch interval (restored after).
    import ray

    from pipeline.actors import THREAD_SWITCH_INTERVAL, SendBatches
    from pipeline.config import SendConfig
    c = coordinator()
    config = SendConfig(actors=2, threads_per_actor=2, latency=0.01)
    before = sys.getswitchinterval()
    udfs = [SendBatches(run_dir=str(tmp_path / "run"), campaign="t", run_id="r1", epoch=1,
                        config=config, coordinator=c, fields=()) for _ in range(2)]
    try:
        assert before != pytest.approx(THREAD_SWITCH_INTERVAL)
        assert sys.getswitchinterval() == pytest.approx(THREAD_SWITCH_INTERVAL)
        assert udfs[0].actor != udfs[1].actor
        assert ray.get(c.wait_for_pool.remote(60), timeout=10) == 2
    finally:
        sys.setswitchinterval(before)
        for udf in udfs:
            udf.engine.close()
            udf._close()
