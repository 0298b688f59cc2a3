"""Everything a run checks before it touches the ledger or starts Ray: flags, files, columns,
templates, SMTP settings. Each mistake is a UsageError that names the flag, file or column."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from dataclasses import dataclass

import polars as pl

from . import generate, ledger, recipients, storage
from .config import DEFAULT_SUBJECT, CampaignConfig, SendConfig, check_campaign_name
from .errors import UsageError
from .hooks import Hooks
from .templates import check_fields

# Without --template a real email would have an empty body: this one says who sent it and why.
DEFAULT_BODY = ("This message was sent by the campaign {{ campaign }} to {{ email }}.\n")


@dataclass(frozen=True, kw_only=True)
class Plan:
    input: str
    campaign: str
    run_dir: str
    run_id: str
    lazy: pl.LazyFrame
    suppression: pl.DataFrame | None
    send: SendConfig  # config.send with defaults resolved against the input


def campaign_name(config: CampaignConfig, input_path: str) -> str:
    if config.campaign:
        return config.campaign
    stem = os.path.basename(input_path.rstrip("/")).split(".")[0] or "campaign"
    stem = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in stem).strip("-._")
    return check_campaign_name(f"{stem or 'campaign'}-{dt.date.today():%Y%m%d}")


def _check_writable(runs_dir: str) -> None:
    if storage.is_uri(runs_dir):
        return
    probe = os.path.abspath(runs_dir)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--runs-dir {runs_dir}: not a writable directory ({probe})")


def _input_path(config: CampaignConfig, hooks: Hooks) -> str:
    if config.input is not None:
        return config.input
    path = generate.default_input_path(config.data_dir, config.default_rows)
    if not os.path.exists(path):
        hooks.info(f"generating {config.default_rows:,} recipients into {path} (once)")
    return generate.default_input(config.data_dir, config.default_rows)


def _resolve_message(send: SendConfig, columns: list[str]) -> SendConfig:
    message = send.message
    if message.subject == DEFAULT_SUBJECT and "name" not in columns:
        # Only the default adapts (a list without names is fine); a subject the user wrote
        # that names a missing field is an error.
        message = dataclasses.replace(message, subject="Hello")
    if send.sender == "smtp" and message.template is None and message.body is None:
        message = dataclasses.replace(message, body=DEFAULT_BODY)
    # The files sender actors open themselves, as they find them wherever they run.
    smtp = send.smtp
    if smtp.ca_file:
        smtp = dataclasses.replace(smtp, ca_file=storage.absolute(smtp.ca_file))
    send_log = storage.absolute(send.send_log) if send.send_log else None
    return dataclasses.replace(send, message=message, smtp=smtp, send_log=send_log)


def plan(config: CampaignConfig, *, hooks: Hooks | None = None) -> Plan:
    """Check flags, files and columns; raises UsageError before anything is written or started."""
    hooks = hooks or Hooks()
    _check_writable(config.runs_dir)
    input_path = _input_path(config, hooks)
    lazy = recipients.scan(input_path)
    suppression = recipients.read_suppression(config.suppress) if config.suppress else None
    name = campaign_name(config, input_path)
    send = _resolve_message(config.send, lazy.collect_schema().names())
    check_fields(send.message, lazy.collect_schema().names())
    if send.sender == "smtp" and not config.dry_run:
        from .sending.smtp import preflight  # password present, CA file exists: before Ray starts
        preflight(send.smtp)
    run_dir = storage.join(storage.absolute(config.runs_dir), name)
    older = None if config.restart else ledger.older_layout(run_dir)
    if older:
        raise UsageError(f"{older}: this campaign's ledger was written by an earlier bulkmail "
                         "(one file, not laid out by partition) and is not read by this version; "
                         "finish the campaign with that version, or start it over with --restart")
    return Plan(input=input_path, campaign=name, run_dir=run_dir,
                run_id=ledger.new_run_id(), lazy=lazy, suppression=suppression, send=send)
