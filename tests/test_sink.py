"""The local SMTP sink (pipeline/sink.py) and its command-line wrapper, against plain smtplib."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.lab.sink import Sink, fate, free_port

from .conftest import ROOT, from_scripts

MAIL = b"Subject: hi\r\n\r\nhello\r\n"


def test_fate_is_stable_and_close_to_the_shares() -> None:
    addresses = [f"user{i}@example.com" for i in range(20_000)]
    fates = [fate(a, fail_4xx=0.2, fail_5xx=0.05, seed=1) for a in addresses]
    assert fates == [fate(a.upper(), fail_4xx=0.2, fail_5xx=0.05, seed=1) for a in addresses]
    assert fates.count("4xx") / len(fates) == pytest.approx(0.2, abs=0.01)
    assert fates.count("5xx") / len(fates) == pytest.approx(0.05, abs=0.005)
    assert fates != [fate(a, fail_4xx=0.2, fail_5xx=0.05, seed=2) for a in addresses]
    assert {fate(a, fail_4xx=0, fail_5xx=0) for a in addresses[:100]} == {None}


def test_counts_connections_messages_and_rsets_not_its_own_probe() -> None:
    with Sink() as s:
        assert s.stats.connections == 0  # Controller.start()'s probe connection is not counted
        c = smtplib.SMTP(s.host, s.port)
        c.sendmail("a@b.example", ["x@example.com"], MAIL)
        c.rset()
        c.sendmail("a@b.example", ["y@example.com"], MAIL)
        c.quit()
        assert (s.stats.connections, s.stats.messages, s.stats.rsets) == (1, 2, 1)
        assert list(s.stats.per_connection.values()) == [2]
        assert [r.rcpt_tos for r in s.messages_to("y@example.com")] == [("y@example.com",)]
        assert s.received[0].message()["Subject"] == "hi"


def test_421_closes_the_connection_then_the_retry_is_accepted() -> None:
    with Sink(fail_4xx=1.0, transient_times=2) as s:
        for _ in range(2):
            c = smtplib.SMTP(s.host, s.port)
            with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
                c.sendmail("a@b.example", ["x@example.com"], MAIL)
            assert info.value.recipients["x@example.com"][0] == 421
            assert c.sock is None  # smtplib closes on 421, as the server does
        c = smtplib.SMTP(s.host, s.port)
        c.sendmail("a@b.example", ["x@example.com"], MAIL)
        assert s.stats.refused_4xx == 2 and s.stats.messages == 1


def test_stop_and_start_again_on_the_same_port() -> None:
    s = Sink().start()
    try:
        c = smtplib.SMTP(s.host, s.port)
        s.stop()
        with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
            c.sendmail("a@b.example", ["x@example.com"], MAIL)
        with pytest.raises(ConnectionRefusedError):
            smtplib.SMTP(s.host, s.port, timeout=2)
        s.start()
        smtplib.SMTP(s.host, s.port).sendmail("a@b.example", ["x@example.com"], MAIL)
        assert s.stats.messages == 1
    finally:
        s.stop()


def test_store_dir_and_keep(tmp_path: Path) -> None:
    with Sink(keep=False, store_dir=str(tmp_path / "mail")) as s:
        c = smtplib.SMTP(s.host, s.port)
        for i in range(3):
            c.sendmail("a@b.example", [f"u{i}@example.com"], MAIL)
    assert s.received == []
    assert sorted(p.name for p in (tmp_path / "mail").iterdir()) == [
        "000000001.eml", "000000002.eml", "000000003.eml"]


def test_the_script_runs_and_reports_totals(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts/smtp_sink.py"), "--port",
                             str(port), "--fail-5xx", "1", "--every", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert "listening on 127.0.0.1" in proc.stdout.readline()
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtplib.SMTP("127.0.0.1", port).sendmail("a@b.example", ["x@example.com"], MAIL)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "0 messages over 1 connections" in out and "5xx 1" in out


def test_exact_wait_sink_waits_before_each_data_reply_and_counts() -> None:
    """The benchmarks' exact-wait sink (scripts/exact_wait_sink.py): lock-step (smtplib), then
    pipelined groups on a raw socket with an empty body, a dot-stuffed line and a body whose
    end comes split over two writes: every reply in order, nothing extra, the count right."""
    import socket
    import time
    sink = from_scripts("exact_wait_sink").ExactWaitSink(0.3)
    try:
        c = smtplib.SMTP("127.0.0.1", sink.port)
        c.ehlo()
        assert c.has_extn("pipelining")
        t0 = time.monotonic()
        c.sendmail("a@b.example", ["x@example.com"], MAIL)
        assert 0.3 <= time.monotonic() - t0 < 1.2  # loose above: a loaded machine
        c.quit()
        s = socket.create_connection(("127.0.0.1", sink.port), timeout=10)
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        s.sendall(b"EHLO me\r\n")
        while f.readline()[3:4] == b"-":
            pass
        group = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n"
        for body in ([b".\r\n"],  # an empty message
                     [b"Subject: dots\r\n\r\n..not the end\r\n.\r\n"],
                     [b"Subject: split\r\n\r\nhi\r", b"\n.", b"\r\n"]):
            t0 = time.monotonic()
            s.sendall(group)
            assert [f.readline()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
            assert time.monotonic() - t0 >= 0.3
            for piece in body:
                s.sendall(piece)
                time.sleep(0.05)
            assert f.readline()[:3] == b"250"
        s.sendall(b"QUIT\r\n")
        assert f.readline()[:3] == b"221" and f.read() == b""  # no reply left over
        s.close()
    finally:
        count = sink.stop()
    assert count == 4
