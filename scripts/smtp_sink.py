"""A local SMTP server that accepts, counts and optionally stores mail: try bulkmail's SMTP sender
without sending real email.

    python scripts/smtp_sink.py --port 8025                       # accept everything
    python scripts/smtp_sink.py --port 8025 --fail-4xx 0.2 --fail-5xx 0.01 --store mail/

Then, in another terminal:

    python -m pipeline.run --rows 10000 --sender smtp --smtp-port 8025 --actors 2 \\
        --threads-per-actor 20 --no-dashboard

It listens on loopback only. Every few seconds it prints connections, messages and refusals;
Ctrl-C prints the totals and stops.
"""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from types import TracebackType

from pipeline.lab.sink import Sink, free_port


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (keep it loopback)")
    p.add_argument("--port", type=int, default=8025)
    p.add_argument("--fail-4xx", type=float, default=0.0,
                   help="share of recipients answered '421 try again later' on their first "
                   "--transient-times attempts (then accepted)")
    p.add_argument("--transient-times", type=int, default=1)
    p.add_argument("--fail-5xx", type=float, default=0.0,
                   help="share of recipients refused for good with '550 mailbox unavailable'")
    p.add_argument("--seed", type=int, default=0, help="which recipients are refused")
    p.add_argument("--delay", type=float, default=0.0,
                   help="seconds to wait before accepting each message (a real server's latency)")
    p.add_argument("--store", metavar="DIR", help="write every accepted message to DIR as .eml")
    p.add_argument("--cert", help="PEM certificate (with --key): offer STARTTLS")
    p.add_argument("--key", help="PEM private key for --cert")
    p.add_argument("--user", help="require AUTH as this user (needs --cert); the password is "
                   "read from $BULKMAIL_SMTP_PASSWORD, as the sender does")
    p.add_argument("--every", type=float, default=5.0, help="seconds between status lines")
    return p.parse_args(argv)


class SinkProcess:
    """This sink in a process of its own, for a benchmark or a test whose own process must not
    share its GIL with the server (a pause there would pause the server): `port`, `pid`,
    `stop()`. `options` are this script's flags."""

    def __init__(self, *options: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, __file__, "--port", str(self.port),
                                      "--every", "3600", *options],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()  # its first line, once it listens
        if "listening on" not in first:
            raise RuntimeError(f"scripts/smtp_sink.py did not start: {first}{self.stop()}")

    def stop(self) -> str:
        """Stop it (killed if it will not go); what it wrote to stderr."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err

    def __enter__(self) -> SinkProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    tls_context = None
    if a.cert:
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_context.load_cert_chain(a.cert, a.key)
    auth = None
    if a.user:
        password = os.environ.get("BULKMAIL_SMTP_PASSWORD")
        if not password or not a.cert:
            print("smtp_sink: --user needs --cert/--key and $BULKMAIL_SMTP_PASSWORD", file=sys.stderr)
            return 2
        auth = {a.user: password}
    try:
        sink = Sink(a.host, a.port, fail_4xx=a.fail_4xx, fail_5xx=a.fail_5xx,
                    transient_times=a.transient_times, seed=a.seed, keep=False, delay=a.delay,
                    store_dir=a.store, tls="starttls" if tls_context else "none",
                    tls_context=tls_context, auth=auth)
        sink.start()
    except (ValueError, OSError) as exc:
        print(f"smtp_sink: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"smtp_sink: listening on {a.host}:{a.port}"
          f"{' with STARTTLS' if tls_context else ''}"
          f"{f', storing in {a.store}' if a.store else ''}  (Ctrl-C to stop)", flush=True)
    t0, last = time.monotonic(), 0
    while not stop.wait(a.every):
        s = sink.stats
        print(f"[{time.strftime('%H:%M:%S')}] connections {s.connections:,}  messages "
              f"{s.messages:,} (+{(s.messages - last) / a.every:,.0f}/s)  refused 4xx "
              f"{s.refused_4xx:,} 5xx {s.refused_5xx:,}", flush=True)
        last = s.messages
    sink.stop()
    s = sink.stats
    elapsed = time.monotonic() - t0
    print(f"smtp_sink: {s.messages:,} messages over {s.connections:,} connections in "
          f"{elapsed:,.0f} s; refused 4xx {s.refused_4xx:,}, 5xx {s.refused_5xx:,}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
