"""Shared storage: input, suppression list and run directory as s3:// URIs.

Against moto's S3 server on loopback. The sender actors run in Ray worker processes that were
started (by the session fixture) before this server existed, so they can only reach it through
the settings the run forwards to them (storage.forwarded_env → the actors' runtime_env).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import polars as pl
import pytest

from pipeline import generate, ledger, storage
from pipeline.campaign import run_campaign

from .conftest import S3_BUCKET, campaign

BUCKET = S3_BUCKET


def _keys(client: object, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)  # type: ignore[attr-defined]
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def test_forwarded_env_holds_settings_not_secrets(s3: object) -> None:
    env = storage.forwarded_env()
    assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    assert env["AWS_REQUEST_CHECKSUM_CALCULATION"] == "when_required"
    assert not any("SECRET" in k or "ACCESS_KEY" in k or "TOKEN" in k for k in env)


@pytest.mark.usefixtures("ray_session")
def test_run_reads_input_and_suppression_and_writes_ledger_and_report_in_s3(
        s3: object, tmp_path: Path) -> None:
    rows = 1500
    frame = generate.generate(rows, seed=3)
    storage.write_table(frame.to_arrow(), f"s3://{BUCKET}/in/recipients.parquet")
    suppressed = frame["email"].head(10).to_list()
    storage.write_text(f"s3://{BUCKET}/in/suppress.txt", "\n".join(suppressed) + "\n")

    config = campaign(tmp_path, f"s3://{BUCKET}/in/recipients.parquet", actors=3,
                      suppress=f"s3://{BUCKET}/in/suppress.txt")
    config = dataclasses.replace(config, runs_dir=f"s3://{BUCKET}/runs")
    rep = run_campaign(config)

    keys = _keys(s3, "runs/test/")
    assert {"runs/test/ledger.parquet/part-00000.parquet", "runs/test/report.json",
            "runs/test/report.md"} <= keys
    assert not [k for k in keys if k.startswith("runs/test/ledger/") and k.endswith(".parquet")]
    assert not (tmp_path / "runs").exists()  # nothing went to local disk instead
    led = ledger.read_ledger(f"s3://{BUCKET}/runs/test")
    assert isinstance(led, pl.DataFrame)
    assert led.height == rows and led["id"].n_unique() == rows
    assert led.filter(pl.col("status") == "suppressed").height == 10
    sent = led.filter(pl.col("status") == "sent")
    assert sent.height == rows - 10
    # Sent rows come only from ledger parts the actors wrote to S3 themselves.
    assert sent["actor"].null_count() == 0 and sent["actor"].n_unique() == 3
    saved = json.loads(storage.read_text(f"s3://{BUCKET}/runs/test/report.json"))
    assert saved["counts"] == rep.to_json()["counts"] and saved["counts"]["reconciled"]  # type: ignore[union-attr]

    # Resume reads the ledger back from S3: nothing is sent twice.
    again = run_campaign(config)
    assert again.counts.already_done == rows and again.counts.sent == 0
