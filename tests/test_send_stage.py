"""The send stage, on the session's Ray: the lease deadline the sender actors obey; Ray's
imports ahead of the stage (its batch sizes: test_batching.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import generate, send_stage
from pipeline.hooks import Hooks, Stages

from .conftest import ROOT, campaign
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


# Enters `prefetching` with its thread held back (a loaded machine), imports a stage module as
# the campaign does at once, and prints what Ray's environment was when Ray was first imported.
FIRST_IMPORT = """
import os, sys, threading, time
seen = []
def audit(event, args):
    if event == "import" and args[0] == "ray" and not seen:
        seen.append((os.environ.get("RAY_AUTH_MODE"), threading.current_thread().name))
sys.addaudithook(audit)
held = []
def held_back(frame, event, arg):
    if threading.current_thread().name == "prefetch-imports" and not held:
        held.append(1)
        time.sleep(0.5)
threading.settrace(held_back)
from pipeline import send_stage
from pipeline.config import CampaignConfig
with send_stage.prefetching(CampaignConfig(input="x.parquet", charts=False)):
    from pipeline import load_stage
print(seen)
"""


def test_ray_is_first_imported_with_its_environment_whichever_thread_imports_it() -> None:
    """Ray reads RAY_AUTH_MODE when first imported (set later, it is ignored): a dry run whose
    main thread imported a stage module before the prefetch thread had set it came up without
    token authentication and could not join the session's Ray (once, in CI)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    res = subprocess.run([sys.executable, "-c", FIRST_IMPORT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[('token', 'MainThread')]", res.stdout
