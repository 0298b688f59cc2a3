"""The send stage on the session's Ray: the lease deadline the sender actors obey."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline import generate, send_stage
from pipeline.hooks import Hooks, Stages

from .conftest import campaign
from .loading import load


class RenewedOnce:
    """A lease about to lapse when the stage starts (0.3 s left) and renewed for ten minutes at
    the next look: the send stage's first read sees the one, every later read the other."""

    def __init__(self) -> None:
        self.reads = 0
        self.renewed = time.time() + 600

    @property
    def valid_until(self) -> float:
        self.reads += 1
        return time.time() + 0.3 if self.reads == 1 else self.renewed

    @property
    def lost(self) -> bool:
        return False


@pytest.mark.usefixtures("ray_session")
def test_a_renewal_during_the_stage_start_reaches_the_senders(tmp_path: Path) -> None:
    # Cutting the blocks and starting the actors take longer than the 0.3 s left: the senders
    # only send if the renewal reaches the coordinator before their first batch asks it.
    rows = 400
    loaded = load(generate.generate(rows), block_rows=100)
    assert loaded.stage is not None
    config = campaign(tmp_path, "unused.parquet", actors=2, threads_per_actor=5)
    job = send_stage.SendJob(campaign="test", run_dir=str(tmp_path / "runs/test"), run_id="r1",
                             epoch=1, send=config.send, fields=loaded.fields)
    lease = RenewedOnce()
    outcome = send_stage.send(loaded.stage, job, config=config, hooks=Hooks(), stages=Stages(),
                              lease=lease)
    assert lease.reads > 1
    assert outcome.totals.sent == rows and outcome.totals.abandoned == 0, outcome.totals
    assert not outcome.interrupted and not outcome.lease_lost
