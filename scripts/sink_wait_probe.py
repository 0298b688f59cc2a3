"""How long `smtp-sink -w 1` really waits per DATA under many connections, without Ray.

    python scripts/sink_wait_probe.py                  # 8 processes × 100 threads, random starts
    python scripts/sink_wait_probe.py --processes 1 --threads 1 --lockstep
    python scripts/sink_wait_probe.py --client raw-chained   # raw sockets, no bulkmail code

Each thread keeps one `SmtpSender` connection (bulkmail's own client) and sends --messages
messages one after the other; with random starts (the default) the threads begin at random
moments over 2 s, as a running campaign's are. It prints the rate and the latency quantiles: a
sink that waited exactly 1 s would give every message 1.0x s.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_smtp_clients import SmtpSink, senders  # noqa: E402

from pipeline.messages import Message  # noqa: E402

RAW_MESSAGE = b"From: a@b.example\r\nTo: x@example.com\r\nSubject: hi\r\n\r\nhello\r\n.\r\n"
RAW_GROUP = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n"


def raw_messages(port: int, messages: int, chained: bool) -> list[float]:
    """One connection on a raw socket: `messages` transactions, each as MAIL + RCPT + DATA in
    one write and the data in another; chained, the data and the next message's MAIL, RCPT
    and DATA go in one write (as the raw asyncio client in bench_smtp_clients.py does). The
    seconds per message."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")
    f.readline()
    s.sendall(b"EHLO probe\r\n")
    while f.readline()[3:4] == b"-":
        pass
    out = []
    t = time.time()
    if chained:
        s.sendall(RAW_GROUP)
        [f.readline() for _ in range(3)]
    for k in range(messages):
        if chained:
            last = k == messages - 1
            s.sendall(RAW_MESSAGE + (b"" if last else RAW_GROUP))
            [f.readline() for _ in range(1 if last else 4)]
        else:
            s.sendall(RAW_GROUP)
            [f.readline() for _ in range(3)]
            s.sendall(RAW_MESSAGE)
            f.readline()
        now = time.time()
        out.append(now - t)
        t = now
    s.sendall(b"QUIT\r\n")
    s.close()
    return out


def one_process(port: int, threads: int, messages: int, lockstep: bool, client: str,
                out: Any) -> None:
    sender = senders(port, None)[0]
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        if not lockstep:
            time.sleep(random.random() * 2)
        if client != "bulkmail":
            got = raw_messages(port, messages, chained=client == "raw-chained")
            with lock:
                latencies.extend(got)
            return
        for k in range(messages):
            m = Message(i * messages + k, f"u{i}-{k}@example.org", f"<p.{i}.{k}@x>", {"name": "P"})
            t = time.time()
            sender.send(m)
            with lock:
                latencies.append(time.time() - t)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put(latencies)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--threads", type=int, default=100, help="per process")
    ap.add_argument("--messages", type=int, default=8, help="per thread")
    ap.add_argument("--lockstep", action="store_true", help="all threads start at once")
    ap.add_argument("--client", choices=("bulkmail", "raw", "raw-chained"), default="bulkmail",
                    help="each thread's client: bulkmail's SmtpSender, or a raw socket "
                    "(raw-chained: each message's data and the next one's commands in one write)")
    a = ap.parse_args()
    sink = SmtpSink(1)
    try:
        out: Any = mp.Queue()
        t0 = time.time()
        procs = [mp.Process(target=one_process,
                            args=(sink.port, a.threads, a.messages, a.lockstep, a.client, out))
                 for _ in range(a.processes)]
        for p in procs:
            p.start()
        lat = [x for _ in procs for x in out.get()]
        for p in procs:
            p.join()
        wall = time.time() - t0
    finally:
        sink.stop()
    q = statistics.quantiles(lat, n=20)
    print(f"{a.processes} × {a.threads} threads ({a.client}), {len(lat):,} messages against "
          "smtp-sink -w 1: "
          f"{len(lat) / wall:,.0f}/s over {wall:.2f} s (process start included)")
    print(f"latency: min {min(lat):.3f}  p5 {q[0]:.3f}  p50 {statistics.median(lat):.3f}  "
          f"p95 {q[-1]:.3f}  mean {statistics.mean(lat):.3f} s; "
          f"{sum(1 for x in lat if x < 0.95):,} under 0.95 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
