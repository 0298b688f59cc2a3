"""A lean SMTP sink that waits exactly N seconds before answering each DATA, as `smtp-sink -w N`
means to, for benchmarks on a small machine.

    python scripts/exact_wait_sink.py --port 2525 --wait 1     # Ctrl-C prints the count

Why not the two servers at hand (measured with the card, 8 actors × 100 threads, 16,000
messages, 2 cores; README "SMTP throughput"): Postfix's `smtp-sink -w 1` keeps time in whole
seconds, so its replies came 0.02-1.8 s after DATA (scripts/sink_wait_probe.py), and
aiosmtpd (`scripts/smtp_sink.py --delay 1`, in a process of its own) used 0.55 of the 2 cores
at 800 messages/s, which put its p95 at 1.18 s. Against this one the card's transactions
took 1.005 s at p50 and 1.015-1.035 s at p99, and it used 0.08 of a core. It accepts
everything, offers PIPELINING, answers a pipelined group's replies in order, and keeps
nothing; it is not for tests of the protocol (those use aiosmtpd and smtp-sink).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.lab.sink import free_port  # noqa: E402

EHLO = (b"250-exact-wait-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
        b"250 SIZE 100000000\r\n")


class _Session(asyncio.Protocol):
    def __init__(self, wait: float, counts: list[int]) -> None:
        self.wait = wait
        self.counts = counts
        self.buf = bytearray()
        self.scanned = 0  # bytes of the body already searched for its end
        self.in_data = False

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        transport.write(b"220 exact-wait-sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out: list[bytes] = []
        while True:
            if self.in_data:
                # The body ends at CRLF "." CRLF; a CRLF was put in front of it (below), so an
                # empty body ends there too. Search only what is new (a long body comes in
                # many reads).
                end = self.buf.find(b"\r\n.\r\n", max(0, self.scanned - 4))
                if end < 0:
                    self.scanned = len(self.buf)
                    break
                del self.buf[:end + 5]
                self.in_data = False
                self.counts[0] += 1
                out.append(b"250 2.0.0 queued\r\n")
                continue
            eol = self.buf.find(b"\r\n")
            if eol < 0:
                break
            verb = bytes(self.buf[:min(eol, 4)]).upper()
            del self.buf[:eol + 2]
            if verb == b"EHLO":
                out.append(EHLO)
            elif verb == b"DATA":
                # Like smtp-sink -w: the wait comes before the reply to DATA (354). A client
                # sends the body only after it (one that does not gets its replies out of
                # order: this sink is for benchmarks, not for protocol tests).
                self._write(out)
                out = []
                self.in_data = True
                self.buf[:0] = b"\r\n"
                self.scanned = 0
                asyncio.get_running_loop().call_later(self.wait, self._write,
                                                      [b"354 3.0.0 go ahead\r\n"])
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 bye\r\n")
                self._write(out)
                self.t.close()
                return
            else:  # HELO, MAIL, RCPT, RSET, NOOP: all accepted
                out.append(b"250 2.0.0 ok\r\n")
        self._write(out)

    def _write(self, replies: list[bytes]) -> None:
        if replies and not self.t.is_closing():
            self.t.write(b"".join(replies))


async def serve(port: int, wait: float, counts: list[int], ready: Any = None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Session(wait, counts), "127.0.0.1", port,
                                      backlog=4096)
    if ready is not None:
        ready()
    async with server:
        await server.serve_forever()


class ExactWaitSink:
    """This sink in a process of its own on a free loopback port (as bench_smtp_clients'
    SmtpSink runs smtp-sink), stopped by `stop`."""

    def __init__(self, wait: float) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--port", str(self.port),
             "--wait", str(wait)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.stop()
            raise SystemExit("exact_wait_sink.py did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> int:
        """Stop it; the number of messages it accepted."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return int(out.split()[-1]) if out.split() else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=2525)
    ap.add_argument("--wait", type=float, default=1.0, help="seconds before each DATA's reply")
    a = ap.parse_args(argv)
    counts = [0]
    try:
        import uvloop
        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    started = time.monotonic()
    try:
        run(serve(a.port, a.wait, counts, ready=lambda: print("ready", flush=True)))
    except KeyboardInterrupt:
        pass
    print(f"accepted {counts[0]} messages in {time.monotonic() - started:.1f} s: {counts[0]}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
