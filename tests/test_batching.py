"""Batching: how the rows are cut into batches, how many actors and calls in flight a list
gets, and when sending threads connect ahead."""

from __future__ import annotations

import dataclasses

from pipeline import batching
from pipeline.config import SendConfig


def smtp(mode: str, actors: int, per_actor: int) -> SendConfig:
    return SendConfig(sender="smtp", mode=mode, actors=actors, threads_per_actor=per_actor,
                      concurrency_per_actor=per_actor)


def test_real_smtp_batches_grow_with_the_list_but_leave_every_actor_twenty() -> None:
    size = batching.batch_size_for
    # The card against a slow server: four rounds of the pool a batch (40 batches, 5 an actor).
    assert size(smtp("threads", 8, 100), 16_000) == 400
    assert size(smtp("threads", 8, 100), 2_000) == 63  # never fewer than 4 batches an actor
    # A fast server: 100,000 rows on 2 × 100 threads, batches of 2,000 (the cap), not 100.
    assert size(smtp("threads", 2, 100), 100_000) == 2_000
    assert size(smtp("async", 2, 2_000), 100_000) == 2_500  # 20 an actor, not 1,000
    # 100 connections carry 200 sends at a time: 20 s of them against a 1 s server.
    assert size(smtp("async", 2, 2_000), 1_000_000) == 4_000
    assert size(smtp("threads", 2, 10), 100_000) == 200  # 10 threads: 20 s of theirs, not 2,000
    assert size(smtp("async", 2, 50_000), 1_000_000) == 12_500  # the pool's quarter is larger
    for rows in (1, 999, 16_000, 40_001, 333_333):
        for cfg in (smtp("threads", 3, 10), smtp("async", 3, 200)):
            batches = -(-rows // size(cfg, rows))
            assert batches >= min(rows, 4 * cfg.actors), (cfg.mode, rows)  # the old floor holds
            pools = 4 if cfg.mode == "threads" else 1  # a thread's four rounds, or one pool
            assert size(cfg, rows) <= max(pools * cfg.concurrency, -(-rows // (3 * 20))), \
                (cfg.mode, rows)
    # The fake sender's latency is known: its batches are sized by it, as before.
    fake = SendConfig(mode="async", actors=2, concurrency_per_actor=50_000, latency=0.5)
    assert size(fake, 1_000_000) == 12_500
    assert size(SendConfig(actors=8, threads_per_actor=100, latency=0.5), 1_000_000) == 100
    # And --batch-size is the user's.
    assert size(SendConfig(sender="smtp", batch_size=7), 1_000_000) == 7


def test_threads_connect_ahead_only_when_one_batch_fills_the_pool() -> None:
    card = smtp("threads", 8, 100)
    assert batching.warm_connections(card, batching.batch_size_for(card, 16_000))
    assert not batching.warm_connections(card, 40)  # 60 of each actor's threads would idle
    assert not batching.warm_connections(smtp("async", 8, 100), 400)  # pumps connect as needed
    assert not batching.warm_connections(SendConfig(actors=8, threads_per_actor=100), 400)
    # Under a rate a thread's first turn may come long after it connected: no warming.
    assert not batching.warm_connections(dataclasses.replace(card, rate=10.0), 400)


def test_no_more_sender_actors_than_batches() -> None:
    card = SendConfig(actors=8, threads_per_actor=100)
    assert batching.pool_for(card, 3).actors == 3
    assert batching.pool_for(card, 3).threads_per_actor == 100
    assert batching.pool_for(card, 8) is card and batching.pool_for(card, 500) is card
    assert batching.pool_for(card, 0) is card  # nothing to send: no send stage at all
