"""How the rows to send are cut into batches, how many batches each sender actor runs at once,
how many actors a list needs, and whether sending threads connect ahead: the send stage's
sizing, measured (the numbers behind each rule are beside it; no Ray here)."""

from __future__ import annotations

import dataclasses
import math

from .config import SendConfig

SMTP_BATCHES_PER_ACTOR = 20  # with real SMTP, batches as large as leave each actor this many,
SMTP_BATCH_SECONDS = 20  # as the actor's sends in flight get through in this long at 1 s each,
SMTP_BATCH_CAP = {"threads": 2_000, "async": 8_000}  # and no more rows than this (_smtp_batch)
# Threads over SMTP: a batch is at least this many rounds of the pool (each thread sends this
# many of its messages). A batch's fixed costs (Ray Data's hand-off on the driver and in the
# actor, three coordinator calls, a ledger file: about 20 ms of the machine's CPU, from batches
# of 100 against 2,500 in docs/ray-notes.md, "Ray Data") fall when its last reply comes in, in
# the burst of replies the next round must answer. The card against smtp-sink -w 1: 0.78 of
# ideal three times with a pool a batch (100), 0.84-0.86 with four (README, "SMTP throughput").
SMTP_THREAD_ROUNDS = 4


def batch_size_for(send: SendConfig, rows: int) -> int:
    """Rows per batch (the blocks the load cuts, one `map_batches` call each) for `rows`."""
    if send.batch_size:
        return send.batch_size
    # One batch keeps an actor's workers busy for about one latency; two calls in flight per
    # actor keep the next batch queued behind it. Cap so every actor sees at least 4 batches,
    # otherwise the tail waits on one actor.
    per_actor_share = math.ceil(rows / (send.actors * 4)) if rows else 1
    rate = send.rate
    relay_rates = _relay_rates(send)
    if relay_rates:
        # Relays with a rate pace the sends that chose them, as --rate paces all: size by their
        # sum (what the run sends per second at least, or at most when every relay has one).
        rate = min(rate, sum(relay_rates)) if rate is not None else sum(relay_rates)
    if rate is not None:
        # Rate-limited, a batch of `concurrency` drains in a fraction of a second, and the
        # per-batch costs (ledger flush, Ray Data hand-off: tens of ms on a loaded machine)
        # open gaps in the rate: measured 150/s for --rate 200 with batches of 20. A batch of
        # one second of the actor's share of the rate hides them.
        share = math.ceil(rate / send.actors)
        return max(1, min(per_actor_share, max(send.concurrency, share)))
    if send.mode == "async":
        # Tens of thousands of workers per actor: a batch of the whole pool drains it at every
        # batch boundary (the next batch only arrives once the last email of the previous one
        # is recorded), so the pool is fed in quarters, with more calls in flight (_calls).
        # Not below 1,000 rows (or the pool, if smaller): each call takes Ray Data tens of ms
        # to dispatch, and quarters of a small pool slowed its start (88% of ideal at 2 × 50).
        size = max(math.ceil(send.concurrency / 4), min(send.concurrency, 1000))
    else:
        # Threads: one pool a batch (over SMTP, SMTP_THREAD_ROUNDS of them), and at least half
        # a second of the pool's sends where the latency is known (the fake sender): each call
        # costs tens of ms, which halved the rate of 10-row batches at 0.05 s (2 × 10 threads,
        # 3,000 rows). Not more for the fake: batches of 1,000 rows at 8 × 100 threads, 0.5 s,
        # gave 0.948 of ideal against 0.985 with one pool (100).
        size = send.concurrency
        if send.sender == "fake" and 0 < send.latency < 0.5:
            size = math.ceil(send.concurrency * 0.5 / send.latency)
        elif send.sender == "smtp":
            size = SMTP_THREAD_ROUNDS * send.concurrency
    if send.sender == "smtp":
        size = max(size, _smtp_batch(send, rows))
    return max(1, min(size, per_actor_share))


def _relay_rates(send: SendConfig) -> list[float]:
    """The rates of the relays that have one (only --sender smtp sends through relays)."""
    if send.sender != "smtp":
        return []
    return [r.rate for r in send.smtp.effective_relays if r.rate is not None]


def _smtp_batch(send: SendConfig, rows: int) -> int:
    """A real server's latency is not known before the run. Against a fast one a pool's batch
    is over in tens of ms, not much more than what Ray Data spends on each batch (milliseconds
    of the driver's CPU, and the pool waiting for the next one). Against smtp-sink on loopback,
    100,000 messages, 2 actors × 100 threads sent 4,200-4,500/s in batches of 100 and
    8,400-8,900/s in batches of 2,500; 2 × 2,000 async 19,600-20,300/s in 1,000 and
    21,900-22,200/s in 2,500 (docs/ray-notes.md). So batches grow with the list while every
    actor still gets SMTP_BATCHES_PER_ACTOR of them (the last ones, on fewer actors, then cost
    the window a twentieth at most), up to what the actor's sends in flight get through in
    SMTP_BATCH_SECONDS against a server that takes 1 s a message (100 threads: 2,000 rows):
    the progress line counts finished batches."""
    per_actor = math.ceil(rows / (send.actors * SMTP_BATCHES_PER_ACTOR)) if rows else 1
    in_flight = send.concurrency
    if send.mode == "async" and send.smtp.max_connections is not None:
        # Each connection carries a transaction and the next one's commands (wire.py).
        in_flight = min(in_flight, 2 * send.smtp.max_connections)
    return min(per_actor, SMTP_BATCH_SECONDS * in_flight, SMTP_BATCH_CAP[send.mode])


def pool_for(send: SendConfig, batches: int) -> SendConfig:
    """No more sender actors than batches (load_stage.Loaded.batches): the others would only
    start (about a second of CPU each on 2 cores), hold the pool's start for up to
    actors.POOL_START_BOUND, and send nothing (a short list, or a resume with little left)."""
    return dataclasses.replace(send, actors=batches) if 0 < batches < send.actors else send


def calls_per_actor(send: SendConfig, batch_size: int) -> int:
    """Batches in flight per actor: two in threads mode, four with SMTP; in async mode enough to
    hold twice the pool (a full pool plus as much again queued), each call a thread blocked on
    its batch."""
    if send.mode != "async":
        # A sending thread over SMTP holds two messages at once (the next one's commands go
        # out with this one's data, sending/threads.py): with two batches of one pool in
        # flight the queue ran dry at every batch's end, and the card against smtp-sink -w 1
        # kept 0.72-0.79 of ideal; with four 0.80-0.86 (README, "SMTP throughput").
        return 4 if send.sender == "smtp" else 2
    return max(2, min(64, math.ceil(3 * send.concurrency / batch_size)))


def warm_connections(send: SendConfig, batch_size: int) -> bool:
    """Whether the sending threads open their SMTP connections as their actor starts, before
    its first batch: when one batch fills the pool, so every thread will send. Otherwise the
    run's first round waits behind 800 connections and EHLOs at once: against smtp-sink -w 1
    the card's first full round of replies came 2.54-2.58 s into its send window with the
    threads connected ahead, 2.75-2.78 s in two cold runs of three (README, "SMTP throughput").
    Not under --rate or a relay's rate: a thread's first turn may come long after it connected,
    and servers drop idle connections."""
    rated = send.rate is not None or bool(_relay_rates(send))
    return (send.sender == "smtp" and send.mode == "threads" and not rated
            and batch_size >= send.concurrency)
