"""Checks before the ledger or Ray is touched (plan.py): defaults resolved against the input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import polars as pl
import pytest

from pipeline.compose import Composer
from pipeline.config import CampaignConfig, MessageConfig, SendConfig
from pipeline.errors import UsageError
from pipeline.messages import Message
from pipeline.plan import DEFAULT_BODY, plan

from .conftest import write_recipients


def config(tmp_path: Path, **send: object) -> CampaignConfig:
    return CampaignConfig(input=str(write_recipients(tmp_path / "in.parquet", 5)),
                          runs_dir=str(tmp_path / "runs"), campaign="spring",
                          send=SendConfig(**send))  # type: ignore[arg-type]


def test_smtp_without_a_template_sends_a_built_in_body_never_an_empty_one(tmp_path: Path) -> None:
    p = plan(config(tmp_path, sender="smtp"))
    assert p.send.message.body == DEFAULT_BODY
    msg = Composer(p.send.message, campaign=p.campaign).compose(
        Message(3, "ada@example.com", "<spring.3@x.example>", {"name": "Ada"}))
    text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "spring" in text and "ada@example.com" in text


def test_a_template_or_the_fake_sender_keeps_its_own_body(tmp_path: Path) -> None:
    assert plan(config(tmp_path)).send.message.body is None
    body = tmp_path / "body.txt"
    body.write_text("Hi {{ name }}\n")
    p = plan(config(tmp_path, sender="smtp", message=MessageConfig(template=str(body))))
    assert p.send.message.body is None and p.send.message.template == str(body)


def test_default_subject_drops_the_name_for_a_list_without_names(tmp_path: Path) -> None:
    import polars as pl
    pl.DataFrame({"email": ["a@example.com"]}).write_parquet(tmp_path / "n.parquet")
    p = plan(CampaignConfig(input=str(tmp_path / "n.parquet"), runs_dir=str(tmp_path / "runs"),
                            campaign="c"))
    assert p.send.message.subject == "Hello"


def test_a_ledger_of_the_older_layout_is_refused_not_resent(tmp_path: Path) -> None:
    """A campaign begun by a bulkmail whose ledger was one file would, read by this version,
    look empty, and its recipients would be sent again: refused, naming the file."""
    from pipeline import generate as gen
    inp = tmp_path / "in.parquet"
    gen.generate(10).write_parquet(inp)
    run_dir = tmp_path / "runs" / "old"
    run_dir.mkdir(parents=True)
    pl.DataFrame({"id": [1], "status": ["sent"]}).write_parquet(run_dir / "ledger.parquet")
    config = CampaignConfig(input=str(inp), runs_dir=str(tmp_path / "runs"), campaign="old")
    with pytest.raises(UsageError, match=r"ledger\.parquet: this campaign's ledger was written by "
                                         r"an earlier bulkmail"):
        plan(config)
    plan(dataclasses.replace(config, restart=True))  # starting over is allowed
