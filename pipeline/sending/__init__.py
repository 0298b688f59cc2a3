"""Sending: the seam (`base`), its implementations (`fake`, `smtp` over `wire` and `blocking`,
through several relays: `relays`), the engines that drive a sender concurrently inside one
process (`engine`) and the cluster-wide rate limits (`ratelimit`).

No Ray here. The implementation is chosen below, outside the seam.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..config import SendConfig
from .base import DELIVERED, AsyncSender, Outcome, Sender, SendResult

if TYPE_CHECKING:  # the SMTP modules are imported only when an SMTP sender is made
    from .relays import Limiter

__all__ = ["DELIVERED", "AsyncSender", "Outcome", "SendResult", "Sender", "make_sender"]


def make_sender(config: SendConfig, *, campaign: str,
                limiters: Mapping[str, Limiter] | None = None) -> Sender | AsyncSender:
    """The sender `config` asks for. Called inside each actor (secrets are read there).
    `limiters`: the actor's client of each rated relay's schedule, by relay name (SMTP only)."""
    if config.sender == "fake":
        from .fake import FakeSender
        return FakeSender(latency=config.latency, fail_rate=config.fail_rate,
                          permanent_fail_rate=config.permanent_fail_rate, seed=config.seed,
                          send_log=config.send_log)
    if config.sender == "smtp":
        from .smtp import make_smtp_sender
        return make_smtp_sender(config, campaign=campaign, limiters=limiters)
    raise ValueError(f"unknown sender {config.sender!r}")
