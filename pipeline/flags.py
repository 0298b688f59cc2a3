"""The run command's flags, and how they become a CampaignConfig (no Ray; the one file read
here is --relays, so that its mistakes end the run before anything else starts)."""

from __future__ import annotations

import argparse
import tomllib
from typing import Any, NoReturn

from .config import (
    DEFAULT_LATENCY,
    DEFAULT_SUBJECT,
    CampaignConfig,
    MessageConfig,
    Relay,
    RetryPolicy,
    SendConfig,
    SmtpConfig,
)
from .errors import UsageError

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, exit 2, no usage dump: the message names the flag.
        self.exit(EXIT_USAGE, f"bulkmail: error: {message} (see --help)\n")


def build_parser(prog: str = "bulkmail") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=(
        "Send one email to every recipient of a Parquet list, through a pool of Ray actors, "
        "recording each outcome in a resumable ledger under runs/<campaign>/."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("input and campaign")
    g.add_argument("--input", help="recipients: a Parquet file, a directory or glob of them, or a "
                   "URI (s3://...); default: a generated file under --data-dir")
    g.add_argument("--rows", type=int, default=1_000_000,
                   help="size of the generated default input (used without --input)")
    g.add_argument("--data-dir", default="data", help="where the generated default input is cached")
    g.add_argument("--campaign", help="campaign name (a folder under --runs-dir); running again "
                   "with the same name resumes it; default: <input name>-<YYYYMMDD>")
    g.add_argument("--runs-dir", default="runs", help="where campaigns write their ledger and report")
    g.add_argument("--suppress", help="addresses never to mail: Parquet with an 'email' column, or "
                   "text with one address per line")
    g.add_argument("--restart", action="store_true",
                   help="start the campaign over: forget its ledger (everyone is sent again)")
    g.add_argument("--retry-failed", action="store_true",
                   help="on resume, try again the recipients that ended 'failed'")
    g.add_argument("--wave-rows", type=int, default=1_000_000,
                   help="rows of the first wave the load settles and sends while the rest of the "
                   "list loads (each next wave twice as many); 0: the whole list before sending")

    g = p.add_argument_group("sending")
    g.add_argument("--actors", type=int, default=8, help="sender actors (processes)")
    g.add_argument("--threads-per-actor", type=int, default=100, help="sending threads per actor")
    g.add_argument("--mode", choices=["threads", "async"], default="threads",
                   help="threads: a thread pool per actor; async: coroutines on one event loop "
                   "per actor, for tens of thousands of concurrent sends")
    g.add_argument("--concurrency-per-actor", type=int, default=5000,
                   help="concurrent sends per actor in --mode async")
    g.add_argument("--cpus-per-actor", type=float, default=0.25,
                   help="logical CPUs each actor reserves (sending is I/O-bound)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="rows per batch handed to an actor; default: the threads per actor "
                   "(with the fake sender, at least 0.5 s of their sends), or in async mode a "
                   "quarter of its concurrent sends (at least 1,000, or all if fewer); with "
                   "--sender smtp as many rows as leave each actor 20 batches, up to 20 s of "
                   "its sends at 1 s each and 2,000 (threads) or 8,000 (async), and in threads "
                   "mode at least four rounds of the threads; rate-limited, "
                   "one second of an actor's share of the rate (or the pool, if larger); capped "
                   "so each actor gets at least 4 batches")
    g.add_argument("--sender", choices=["fake", "smtp"], default="fake",
                   help="fake: wait --latency seconds per email; smtp: real SMTP")
    g.add_argument("--latency", type=float, default=DEFAULT_LATENCY,
                   help="fake sender: seconds per email")
    g.add_argument("--fail-rate", type=float, default=0.0, help="fake sender: share of recipients "
                   "whose first 1-3 attempts fail with a transient 421")
    g.add_argument("--permanent-fail-rate", type=float, default=0.0,
                   help="fake sender: share of recipients refused with a permanent 550")
    g.add_argument("--seed", type=int, default=0, help="seed for injected failures and jitter")
    g.add_argument("--send-log", help="fake sender: append each delivered recipient id to this file")
    g.add_argument("--max-attempts", type=int, default=3,
                   help="attempts per recipient for transient failures (4xx, connection errors)")
    g.add_argument("--backoff", type=float, default=0.5,
                   help="base of the exponential backoff between attempts, in seconds")
    g.add_argument("--rate", type=float, default=None,
                   help="global limit in emails per second across all actors and nodes")
    g.add_argument("--stop-timeout", type=float, default=5.0,
                   help="after Ctrl-C or SIGTERM, seconds that sends under way may take to "
                   "finish and be recorded before the run exits anyway")
    g.add_argument("--lease-ttl", type=float, default=10.0,
                   help="seconds after its last heartbeat that a dead run's hold on the "
                   "campaign expires (a live run renews it every ttl/4)")

    g = p.add_argument_group("message")
    g.add_argument("--from", dest="from_addr", default="bulkmail <noreply@bulkmail.invalid>",
                   help="From header (its domain also names Message-IDs)")
    g.add_argument("--subject", default=DEFAULT_SUBJECT,
                   help="subject (a Jinja2 template); the default drops the name for an input "
                   "without a 'name' column")
    g.add_argument("--template", help="body template (plain text, Jinja2); a sibling .html file "
                   "makes the message multipart/alternative")
    g.add_argument("--unsubscribe-url", help="List-Unsubscribe URL (a Jinja2 template)")
    g.add_argument("--dry-run", type=int, default=None, metavar="N",
                   help="render the first N messages as .eml files under the run directory; "
                   "send nothing")

    g = p.add_argument_group("SMTP (--sender smtp); the password comes only from "
                             "$BULKMAIL_SMTP_PASSWORD (or the variable a relay's password_env "
                             "names)")
    g.add_argument("--smtp-host", default=argparse.SUPPRESS, help="SMTP server host, or several relays, "
                   "comma-separated, each host or host:port (new connections are spread over "
                   "them; a failing one is taken out of rotation); default: 127.0.0.1")
    g.add_argument("--smtp-port", type=int, default=25, help="SMTP server port")
    g.add_argument("--relays", default=None, metavar="FILE",
                   help="relays from a TOML file of [[relay]] tables (host, port, tls, user, "
                   "password_env, max_connections, rate); keys left out take the --smtp-* value")
    g.add_argument("--smtp-tls", choices=["none", "starttls", "ssl"], default="none",
                   help="none: plain; starttls: upgrade after EHLO; ssl: TLS from the first byte")
    g.add_argument("--smtp-user", default=None,
                   help="AUTH user (the password is read from $BULKMAIL_SMTP_PASSWORD)")
    g.add_argument("--smtp-max-per-connection", type=int, default=100,
                   help="messages per connection before it is replaced")
    g.add_argument("--smtp-max-connections", type=int, default=100,
                   help="--mode async: open connections per actor, all relays together (in "
                   "--mode threads each thread keeps one)")
    g.add_argument("--smtp-timeout", type=float, default=30.0,
                   help="seconds before a silent SMTP server counts as a transient failure")
    g.add_argument("--smtp-ca-file", default=None, help="CA bundle to trust for TLS")

    g = p.add_argument_group("Ray and output")
    g.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto' or host:port); default: $RAY_ADDRESS, "
                   "else a local Ray started and stopped by this run")
    g.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs for a local Ray (default: enough for all actors)")
    g.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard")
    g.add_argument("--no-metrics", action="store_true",
                   help="a local Ray without its metrics pipeline (Prometheus export): less CPU "
                   "for high-throughput runs")
    g.add_argument("--timeline", default=None, help="write Ray's Chrome-trace timeline here")
    g.add_argument("--no-charts", action="store_true", help="skip the PNG charts in the report")
    g.add_argument("--progress-every", type=float, default=10.0,
                   help="seconds between progress lines when stdout is not a terminal")
    g.add_argument("--verbose", action="store_true",
                   help="show Ray's own log lines on the console instead of only in the log file")
    return p


def config_from_args(a: argparse.Namespace) -> CampaignConfig:
    send = SendConfig(
        actors=a.actors, threads_per_actor=a.threads_per_actor, mode=a.mode,
        concurrency_per_actor=a.concurrency_per_actor, cpus_per_actor=a.cpus_per_actor,
        batch_size=a.batch_size, sender=a.sender, latency=a.latency, fail_rate=a.fail_rate,
        permanent_fail_rate=a.permanent_fail_rate, seed=a.seed, send_log=a.send_log,
        retry=RetryPolicy(max_attempts=a.max_attempts, backoff_base=a.backoff),
        smtp=smtp_config(a),
        message=MessageConfig(from_addr=a.from_addr, subject=a.subject, template=a.template,
                              unsubscribe_url=a.unsubscribe_url),
        rate=a.rate, metrics=not a.no_metrics, stop_timeout=a.stop_timeout,
    )
    if a.rows < 0:
        raise UsageError(f"--rows must not be negative, got {a.rows}")
    if a.progress_every <= 0:
        raise UsageError(f"--progress-every must be positive, got {a.progress_every}")
    return CampaignConfig(
        input=a.input, campaign=a.campaign, runs_dir=a.runs_dir, data_dir=a.data_dir,
        default_rows=a.rows, suppress=a.suppress, restart=a.restart, retry_failed=a.retry_failed,
        wave_rows=a.wave_rows, address=a.address, num_cpus=a.num_cpus,
        dashboard=not a.no_dashboard, timeline=a.timeline, dry_run=a.dry_run,
        charts=not a.no_charts, verbose=a.verbose, lease_ttl=a.lease_ttl, send=send)


def smtp_config(a: argparse.Namespace) -> SmtpConfig:
    """--smtp-* and --relays: one relay (host, port) or several (`relays`)."""
    host = getattr(a, "smtp_host", None)  # no default: given or not
    if a.relays is not None and host is not None:
        raise UsageError("--relays and --smtp-host both name the relays: use one of them")
    defaults = dict(port=a.smtp_port, tls=a.smtp_tls, user=a.smtp_user)
    relays = (read_relays(a.relays, defaults) if a.relays is not None
              else parse_hosts(host or "127.0.0.1", defaults))
    one = relays[0] if len(relays) == 1 and a.relays is None else None
    return SmtpConfig(host=one.host if one else "127.0.0.1", port=one.port if one else a.smtp_port,
                      tls=a.smtp_tls, user=a.smtp_user, relays=() if one else relays,
                      max_per_connection=a.smtp_max_per_connection, timeout=a.smtp_timeout,
                      ca_file=a.smtp_ca_file, max_connections=a.smtp_max_connections)


def parse_hosts(value: str, defaults: dict[str, Any]) -> tuple[Relay, ...]:
    """`--smtp-host a,b:2526,[::1]:25`: each host or host:port (the port defaults to --smtp-port)."""
    out = []
    for item in (part.strip() for part in value.split(",")):
        host, port = item, defaults["port"]
        if item.startswith("["):  # [IPv6] or [IPv6]:port
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else (rest or port)
        elif item.count(":") == 1:
            host, port = item.split(":")
        if not str(port).isdigit():
            raise UsageError(f"--smtp-host {value}: port {port!r} of {item!r} is not a number")
        try:
            out.append(Relay(**{**defaults, "host": host, "port": int(port)}))
        except UsageError as exc:
            raise UsageError(f"--smtp-host {value}: {exc}") from None
        if out[-1] in out[:-1]:
            raise UsageError(f"--smtp-host {value}: relay {out[-1].name} is named twice")
    return tuple(out)


# Each key a [[relay]] table may have: the types its value may take, and how to say so.
_TEXT, _WHOLE, _NUMBER = ((str,), "a string"), ((int,), "a whole number"), ((int, float), "a number")
RELAY_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "host": _TEXT, "port": _WHOLE, "tls": _TEXT, "user": _TEXT, "password_env": _TEXT,
    "max_connections": _WHOLE, "rate": _NUMBER}


def read_relays(path: str, defaults: dict[str, Any]) -> tuple[Relay, ...]:
    """The relays of a TOML file of [[relay]] tables; each mistake is one line naming the file
    and the key. A password is never in the file: `password_env` names the variable with it."""
    where = f"--relays {path}"
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"{where}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{where}: not valid TOML: {' '.join(str(exc).split())}") from None
    extra = sorted(set(data) - {"relay"})
    if extra:
        raise UsageError(f"{where}: unknown key {extra[0]!r} (the file holds [[relay]] tables)")
    tables = data.get("relay")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise UsageError(f"{where}: no [[relay]] tables")
    relays = []
    for i, table in enumerate(tables, 1):
        at = f"{where}: [[relay]] {i}"
        for key, value in table.items():
            if key == "password":
                raise UsageError(f"{at}: key 'password': a password is never taken from the file; "
                                 "name the environment variable that holds it with password_env")
            if key not in RELAY_KEYS:
                raise UsageError(f"{at}: unknown key {key!r} (known: {', '.join(RELAY_KEYS)})")
            types, kind = RELAY_KEYS[key]
            if isinstance(value, bool) or not isinstance(value, types):
                raise UsageError(f"{at}: key {key!r} must be {kind}, got {value!r}")
        if "host" not in table:
            raise UsageError(f"{at}: missing key 'host'")
        if "rate" in table:
            table["rate"] = float(table["rate"])
        try:
            relays.append(Relay(**{**defaults, **table}))
        except UsageError as exc:
            raise UsageError(f"{at}: {exc}") from None
    names = [r.name for r in relays]
    for i, name in enumerate(names, 1):
        if names.index(name) + 1 != i:
            raise UsageError(f"{where}: [[relay]] {i}: relay {name} is listed twice")
    return tuple(relays)
