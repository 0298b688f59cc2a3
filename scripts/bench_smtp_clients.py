"""Messages per second into Postfix's smtp-sink on loopback: SMTP client libraries side by side.

    python scripts/bench_smtp_clients.py                 # 50,000 messages or 5 s per client, < 1 min
    python scripts/bench_smtp_clients.py --messages 100000 --seconds 10
    python scripts/bench_smtp_clients.py -w 1 --connections 500   # a server slow to answer DATA

One `smtp-sink` (a C server that offers PIPELINING and answers at once; `-w SECONDS` makes it
wait before each reply to DATA, like a slow server) serves every client in turn,
with the same pre-rendered messages (a few hundred bytes, CRLF, one Message-ID each):

  (a) baseline: a hand-written ThreadPoolExecutor, 100 threads, one reused smtplib connection
      per thread, `sendmail` per message (issue 11's hand-written client);
  (b) smtplib tuned: the same threads, each looping over its share, TCP_NODELAY,
      `mail`/`rcpt`/`data` called directly (no RSET, no per-message EHLO check);
  (c) aiosmtplib, N connections on uvloop, one coroutine each, `sendmail` per message;
  (d) a raw pipelined asyncio client (N connections, one round trip per message: each
      message's body and "." go out in one write with the next message's MAIL, RCPT, DATA):
      the machine's limit;
  (e) bulkmail's senders on its own client (pipeline/sending/wire.py, smtp.py), given the same
      pre-rendered messages: `SmtpSender` from 100 threads (a connection each), and
      `AsyncSmtpSender` from coroutines calling `asend` (its pumps: capped, and one per caller);
  (f) the same senders given `Message`s, so composing each email (pipeline/compose.py) is in.

Each client runs until it has sent `--messages` or for `--seconds`, whichever comes first; its
rate is messages accepted (250 after the data) over its wall time. The CPU column is the
process's CPU time per message (user + system; the sink runs in its own process and is not
counted). Ratios are against (a) and (d).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiosmtplib  # noqa: E402

from pipeline.compose import Envelope  # noqa: E402
from pipeline.config import SmtpConfig  # noqa: E402

SINK = "/usr/sbin/smtp-sink"
FROM = "bench@bulkmail.example"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SmtpSink:
    """Postfix's smtp-sink on a free loopback port (stopped by `stop`, also after a failure)."""

    def __init__(self, wait: float | None) -> None:
        if not os.path.exists(SINK):
            raise SystemExit(f"{SINK} not found: install Postfix (apt-get install postfix)")
        self.port = free_port()
        cmd = [SINK, "-m", "5000"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root without it
        if wait:
            cmd += ["-w", str(wait)]
        cmd += [f"127.0.0.1:{self.port}", "5000"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    self.stop()
                    raise SystemExit(f"smtp-sink did not start: {err.strip()}") from None
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def messages(n: int) -> list[Envelope]:
    out = []
    for i in range(n):
        to = f"user{i}@example.com"
        data = (f"From: bulkmail bench <{FROM}>\r\nTo: Person {i} <{to}>\r\n"
                f"Subject: Hello Person {i}, news for Lyon\r\n"
                "Date: Mon, 01 Jun 2026 10:00:00 +0000\r\n"
                f"Message-ID: <bench.{i}@bulkmail.example>\r\nMIME-Version: 1.0\r\n"
                "Content-Type: text/plain; charset=\"utf-8\"\r\nContent-Transfer-Encoding: 7bit\r\n"
                f"\r\nDear Person {i},\r\n\r\nthis is the free plan newsletter for Lyon.\r\n"
                ".a line that starts with a dot\r\n\r\n-- bulkmail\r\n")
        out.append(Envelope(FROM, to, data.encode(), False))
    return out


@dataclass
class Run:
    name: str
    sent: int
    seconds: float
    cpu: float
    note: str

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


class Source:
    """The messages, handed out once each until they run out or the time is up."""

    def __init__(self, envs: list[Envelope], seconds: float) -> None:
        self.envs = envs
        self._i = 0
        self._lock = threading.Lock()
        self.deadline = time.monotonic() + seconds

    def take(self) -> int | None:
        """The next message's index (None: all sent, or the time is up)."""
        with self._lock:
            if self._i >= len(self.envs) or time.monotonic() > self.deadline:
                return None
            self._i += 1
            return self._i - 1

    def take_async(self) -> int | None:  # one event loop thread: no lock
        if self._i >= len(self.envs) or (self._i & 63 == 0 and time.monotonic() > self.deadline):
            return None
        self._i += 1
        return self._i - 1


def timed(name: str, note: str, body: Callable[[], int]) -> Run:
    c0, t0 = time.process_time(), time.perf_counter()
    sent = body()
    return Run(name, sent, time.perf_counter() - t0, time.process_time() - c0, note)


# --------------------------------------------------------------------------- (a), (b) smtplib

def baseline(port: int, src: Source, threads: int) -> int:
    """One task per message on the executor; each thread keeps one smtplib connection."""
    local = threading.local()
    clients: list[smtplib.SMTP] = []
    lock = threading.Lock()

    def one(env: Envelope) -> bool:
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = smtplib.SMTP("127.0.0.1", port, local_hostname="bench.example")
            with lock:
                clients.append(c)
        c.sendmail(env.sender, [env.recipient], env.data)
        return True

    with ThreadPoolExecutor(threads) as pool:
        sent = sum(pool.map(lambda e: one_deadline(one, e, src), src.envs))
    for c in clients:
        c.quit()
    return sent


def one_deadline(send: Callable[[Envelope], bool], env: Envelope, src: Source) -> int:
    return int(time.monotonic() <= src.deadline and send(env))


def smtplib_tuned(port: int, src: Source, threads: int) -> int:
    def work(_: int) -> int:
        c = smtplib.SMTP("127.0.0.1", port, local_hostname="bench.example")
        assert c.sock is not None
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.ehlo()
        n = 0
        while (i := src.take()) is not None:
            env = src.envs[i]
            c.mail(env.sender)
            c.rcpt(env.recipient)
            n += c.data(env.data)[0] == 250
        c.quit()
        return n
    return run_threads(src, threads, work)


def run_threads(src: Source, threads: int, work: Callable[[int], int]) -> int:
    counts = [0] * threads

    def worker(k: int) -> None:
        counts[k] = work(k)
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts)


# --------------------------------------------------------------------------- (c), (d) asyncio

def on_uvloop(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def aiosmtplib_run(port: int, src: Source, conns: int) -> int:
    async def worker() -> int:
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="bench.example",
                            start_tls=False)
        await c.connect()
        n = 0
        while (i := src.take_async()) is not None:
            env = src.envs[i]
            await c.sendmail(env.sender, [env.recipient], env.data)
            n += 1
        await c.quit()
        return n

    async def main() -> int:
        return sum(await asyncio.gather(*(worker() for _ in range(conns))))
    return on_uvloop(main)


def stuffed(data: bytes) -> bytes:
    data = data.replace(b"\r\n.", b"\r\n..")
    return (b"." + data if data.startswith(b".") else data) + b".\r\n"


async def _replies(reader: asyncio.StreamReader, buf: bytearray, n: int) -> bytes:
    """Read until `n` single-line replies are in; smtp-sink's replies to MAIL, RCPT, DATA and
    "." are one line each."""
    while buf.count(b"\n") < n:
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    out = bytes(buf)
    buf.clear()
    return out


def _group(env: Envelope) -> bytes:
    return b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n" % (env.sender.encode(), env.recipient.encode())


def raw_run(port: int, src: Source, conns: int) -> int:
    async def worker() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        buf = bytearray()
        await _replies(reader, buf, 1)
        writer.write(b"EHLO bench.example\r\n")
        while not buf.endswith(b"\r\n") or b"\n250 " not in b"\n" + buf:
            buf += await reader.read(65536)
        assert b"PIPELINING" in buf
        buf.clear()
        n, pending = 0, False
        i = src.take_async()
        env = src.envs[i] if i is not None else None
        if env is not None:
            writer.write(_group(env))
        while env is not None:
            lines = (await _replies(reader, buf, 3 + pending)).split(b"\r\n")
            if pending:
                n += lines.pop(0).startswith(b"250")
            if not lines[2].startswith(b"354"):
                raise RuntimeError(f"refused: {lines!r}")
            j = src.take_async()
            nxt = src.envs[j] if j is not None else None
            writer.write(stuffed(env.data) + (_group(nxt) if nxt is not None else b""))
            pending, env = True, nxt
        if pending:
            n += (await _replies(reader, buf, 1)).startswith(b"250")
        writer.write(b"QUIT\r\n")
        await writer.drain()
        writer.close()
        return n

    async def main() -> int:
        return sum(await asyncio.gather(*(worker() for _ in range(conns))))
    return on_uvloop(main)


# --------------------------------------------------------------------------- (e), (f) bulkmail

def senders(port: int, conns: int | None) -> tuple[Any, Any]:
    from pipeline.compose import Composer
    from pipeline.config import MessageConfig
    from pipeline.sending.smtp import AsyncSmtpSender, SmtpSender
    cfg = SmtpConfig(host="127.0.0.1", port=port, timeout=30, max_per_connection=100)
    composer = Composer(MessageConfig(from_addr=f"bulkmail bench <{FROM}>", subject="Hello {{ name }}",
                                      body="Dear {{ name }},\n\nthis is the newsletter.\n"), campaign="bench")
    return (SmtpSender(cfg, composer, local_hostname="bench.example"),
            AsyncSmtpSender(cfg, composer, local_hostname="bench.example", max_connections=conns))


def as_messages(envs: list[Envelope]) -> list[Any]:
    from pipeline.messages import Message
    return [Message(i, e.recipient, f"<bench.{i}@bulkmail.example>", {"name": f"Person {i}"})
            for i, e in enumerate(envs)]


def wire_sync(port: int, src: Source, threads: int, compose: bool) -> int:
    sender = senders(port, None)[0]
    items = as_messages(src.envs) if compose else src.envs
    send = sender.send if compose else sender.send_envelope

    def work(_: int) -> int:
        n = 0
        while (i := src.take()) is not None:
            n += send(items[i]).ok
        return n
    try:
        return run_threads(src, threads, work)
    finally:
        sender.close()


def wire_async(port: int, src: Source, coroutines: int, conns: int | None, compose: bool) -> int:
    items = as_messages(src.envs) if compose else src.envs

    async def main() -> int:
        sender = senders(port, conns)[1]
        send = sender.asend if compose else sender.asend_envelope

        async def worker() -> int:
            n = 0
            while (i := src.take_async()) is not None:
                n += (await send(items[i])).ok
            return n
        try:
            return sum(await asyncio.gather(*(worker() for _ in range(coroutines))))
        finally:
            await sender.aclose()
    return on_uvloop(main)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=50_000, help="messages per client")
    p.add_argument("--seconds", type=float, default=5.0, help="time cap per client")
    p.add_argument("--threads", type=int, default=100, help="threads for (a), (b), (e) sync")
    p.add_argument("--connections", type=int, default=100, help="connections for (c), (d), (e) async")
    p.add_argument("--coroutines", type=int, default=1000, help="coroutines sharing the async sender's pool")
    p.add_argument("-w", dest="wait", type=int, default=None,
                   help="passed to smtp-sink: whole seconds it waits before each reply to DATA")
    p.add_argument("--only", nargs="+", help="run only these clients (a b c d e1 e2 e3 f1 f2)")
    a = p.parse_args(argv)
    envs = messages(a.messages)
    size = sum(len(e.data) for e in envs) / len(envs)
    t, c = a.threads, a.connections
    k = a.coroutines
    clients: list[tuple[str, str, Callable[[int, Source], int]]] = [
        ("a", f"(a) baseline: ThreadPoolExecutor + smtplib, {t} threads",
         lambda port, s: baseline(port, s, t)),
        ("b", f"(b) smtplib, {t} threads, NODELAY, no RSET", lambda port, s: smtplib_tuned(port, s, t)),
        ("c", f"(c) aiosmtplib, {c} connections (uvloop)", lambda port, s: aiosmtplib_run(port, s, c)),
        ("d", f"(d) raw pipelined asyncio, {c} connections", lambda port, s: raw_run(port, s, c)),
        ("e1", f"(e) wire, SmtpSender, {t} threads", lambda port, s: wire_sync(port, s, t, False)),
        ("e2", f"(e) wire, AsyncSmtpSender, {k} coroutines, <= {c} conns",
         lambda port, s: wire_async(port, s, k, c, False)),
        ("e3", f"(e) wire, AsyncSmtpSender, {c} coroutines, no cap",
         lambda port, s: wire_async(port, s, c, None, False)),
        ("f1", f"(f) SmtpSender.send incl. composing, {t} threads",
         lambda port, s: wire_sync(port, s, t, True)),
        ("f2", f"(f) AsyncSmtpSender.asend incl. composing, {k} coroutines",
         lambda port, s: wire_async(port, s, k, c, True)),
    ]
    sink = SmtpSink(a.wait)
    runs: list[Run] = []
    try:
        print(f"smtp-sink on 127.0.0.1:{sink.port} (-m 5000, backlog 5000"
              f"{f', -w {a.wait}' if a.wait else ''}); {a.messages:,} messages of "
              f"{size:.0f} bytes per client, at most {a.seconds:g} s each; {os.cpu_count()} CPUs",
              flush=True)
        for key, name, fn in clients:
            if a.only and key not in a.only:
                continue
            src = Source(envs, a.seconds)
            run = timed(name, key, lambda fn=fn, src=src: fn(sink.port, src))  # type: ignore[misc]
            runs.append(run)
            print(f"  {name:<52} {run.rate:>9,.0f} msg/s", flush=True)
    finally:
        sink.stop()
    base = next((r for r in runs if r.note == "a"), None)
    limit = next((r for r in runs if r.note == "d"), None)
    print()
    print("| client | messages | seconds | msg/s | CPU µs/msg | vs (a) | vs (d) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        va = f"{r.rate / base.rate:.1f}x" if base and base.rate else "-"
        vd = f"{r.rate / limit.rate:.2f}" if limit and limit.rate else "-"
        cpu = r.cpu / r.sent * 1e6 if r.sent else 0.0
        print(f"| {r.name} | {r.sent:,} | {r.seconds:.2f} | {r.rate:,.0f} | {cpu:,.0f} | {va} | {vd} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
