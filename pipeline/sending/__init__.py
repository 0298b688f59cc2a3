"""Sending: the seam (`base`), its implementations (`fake`, `smtp`), the engines that drive a
sender concurrently inside one process (`engine`) and the global rate limit (`ratelimit`).

No Ray here. The implementation is chosen below, outside the seam.
"""

from __future__ import annotations

from ..config import SendConfig
from .base import DELIVERED, AsyncSender, Outcome, Sender, SendResult

__all__ = ["DELIVERED", "AsyncSender", "Outcome", "SendResult", "Sender", "make_sender"]


def make_sender(config: SendConfig, *, campaign: str) -> Sender | AsyncSender:
    """The sender `config` asks for. Called inside each actor (secrets are read there)."""
    if config.sender == "fake":
        from .fake import FakeSender
        return FakeSender(latency=config.latency, fail_rate=config.fail_rate,
                          permanent_fail_rate=config.permanent_fail_rate, seed=config.seed,
                          send_log=config.send_log)
    if config.sender == "smtp":
        from .smtp import make_smtp_sender
        return make_smtp_sender(config, campaign=campaign)
    raise ValueError(f"unknown sender {config.sender!r}")
