"""Frozen, keyword-only configuration objects: what a run is asked to do, validated once."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from .errors import UsageError

Mode = Literal["threads", "async"]
SenderKind = Literal["fake", "smtp"]
TlsMode = Literal["none", "starttls", "ssl"]

DEFAULT_LATENCY = 0.5
DEFAULT_SUBJECT = "Hello {{ name }}"  # becomes "Hello" for an input without a name column
_CAMPAIGN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base * 2**(n-1)))."""

    max_attempts: int = 3
    backoff_base: float = 0.5
    backoff_cap: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise UsageError(f"--max-attempts must be at least 1, got {self.max_attempts}")
        if self.backoff_base < 0 or self.backoff_cap < 0:
            raise UsageError("--backoff must not be negative")


@dataclass(frozen=True, kw_only=True)
class Relay:
    """One SMTP relay of several (`SmtpConfig.relays`). The password is never here: only the
    name of the environment variable that holds it, read inside the sender actor."""

    host: str
    port: int = 25
    tls: TlsMode = "none"
    user: str | None = None
    password_env: str = "BULKMAIL_SMTP_PASSWORD"
    max_connections: int | None = None  # per sender actor; None: only SmtpConfig's cap
    rate: float | None = None  # emails per second through this relay, across the cluster

    def __post_init__(self) -> None:
        if not self.host or any(c.isspace() or c in ",[]" for c in self.host):
            raise UsageError(f"relay host {self.host!r} is not a host name or address")
        if isinstance(self.port, bool) or not 0 < self.port < 65536:
            raise UsageError(f"relay {self.host}: port must be in 1..65535, got {self.port}")
        if self.tls not in ("none", "starttls", "ssl"):
            raise UsageError(f"relay {self.host}: tls must be none, starttls or ssl, got {self.tls!r}")
        if self.max_connections is not None and self.max_connections < 1:
            raise UsageError(f"relay {self.name}: max_connections must be at least 1, "
                             f"got {self.max_connections}")
        if self.rate is not None and not self.rate > 0:
            raise UsageError(f"relay {self.name}: rate must be positive, got {self.rate}")

    @property
    def name(self) -> str:
        """How logs, errors and the per-relay rate limiters name it: host:port."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class SmtpConfig:
    host: str = "127.0.0.1"
    port: int = 25
    tls: TlsMode = "none"
    user: str | None = None
    # Read from the environment by the sender itself, so it never travels in a config, a
    # Ray task argument, a report or a log.
    password_env: str = "BULKMAIL_SMTP_PASSWORD"
    max_per_connection: int = 100
    timeout: float = 30.0
    # For tests with a self-signed certificate: a CA file to trust.
    ca_file: str | None = None
    # Several relays (--smtp-host a,b or --relays FILE); empty: the one relay host/port/tls/user.
    relays: tuple[Relay, ...] = ()
    # Connections per sender actor in --mode async, all relays together (None: no cap beyond
    # one per concurrent send). In --mode threads each thread keeps one connection anyway.
    max_connections: int | None = 100

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise UsageError(f"--smtp-port must be in 1..65535, got {self.port}")
        if self.max_per_connection < 1:
            raise UsageError(
                f"--smtp-max-per-connection must be at least 1, got {self.max_per_connection}"
            )
        if self.max_connections is not None and self.max_connections < 1:
            raise UsageError(f"--smtp-max-connections must be at least 1, got {self.max_connections}")
        names = [r.name for r in self.relays]
        if len(set(names)) < len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise UsageError(f"relay {twice} is named twice")
        if not self.relays:
            self.effective_relays  # noqa: B018 - checks host as a relay's

    @property
    def effective_relays(self) -> tuple[Relay, ...]:
        """The relays to send through: `relays`, or else the one that host/port/tls/user name."""
        return self.relays or (Relay(host=self.host, port=self.port, tls=self.tls, user=self.user,
                                     password_env=self.password_env),)


@dataclass(frozen=True, kw_only=True)
class MessageConfig:
    """What each email looks like. Subject, body and unsubscribe URL are Jinja2 templates."""

    from_addr: str = "bulkmail <noreply@bulkmail.invalid>"
    subject: str = DEFAULT_SUBJECT
    template: str | None = None  # path to a plain-text body; a sibling .html makes it multipart
    unsubscribe_url: str | None = None
    # The template files' text, read once by the driver (templates.with_bodies) so that sender
    # actors on other nodes, or with another working directory, need no copy of the files.
    body: str | None = None
    html_body: str | None = None


@dataclass(frozen=True, kw_only=True)
class SendConfig:
    """How the send stage runs. Everything an actor needs travels in here (no secrets)."""

    actors: int = 8
    threads_per_actor: int = 100
    mode: Mode = "threads"
    concurrency_per_actor: int = 5000  # async mode only
    cpus_per_actor: float = 0.25
    batch_size: int | None = None  # None: chosen from concurrency and row count
    sender: SenderKind = "fake"
    latency: float = DEFAULT_LATENCY
    fail_rate: float = 0.0  # fake sender: fraction of attempts that fail transiently
    permanent_fail_rate: float = 0.0  # fake sender: fraction of recipients refused for good
    seed: int = 0
    send_log: str | None = None  # fake sender: append one line per delivered email
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    message: MessageConfig = field(default_factory=MessageConfig)
    rate: float | None = None  # emails per second across the whole cluster
    flush_seconds: float = 0.5
    max_batch_attempts: int = 3  # a batch whose worker dies this often is recorded as failed
    # After a stop request, how long sends already under way may take to finish and be
    # recorded before the run exits anyway (a send cut off then may be repeated on resume).
    stop_timeout: float = 5.0
    # Ray metrics: the actors' counters and histogram (metrics.py) and, for a local Ray, Ray's
    # own metrics pipeline, whose agent used 7.7 s of CPU in a 1M async run on 2 cores (17% of
    # the run's CPU). --no-metrics turns both off for runs nobody watches.
    metrics: bool = True

    def __post_init__(self) -> None:
        for name, value in (("--actors", self.actors), ("--threads-per-actor", self.threads_per_actor),
                            ("--concurrency-per-actor", self.concurrency_per_actor)):
            if value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.latency < 0:
            raise UsageError(f"--latency must not be negative, got {self.latency}")
        for name, rate in (("--fail-rate", self.fail_rate),
                           ("--permanent-fail-rate", self.permanent_fail_rate)):
            if not 0.0 <= rate <= 1.0:
                raise UsageError(f"{name} must be within [0, 1], got {rate}")
        if self.cpus_per_actor <= 0:
            raise UsageError(f"--cpus-per-actor must be positive, got {self.cpus_per_actor}")
        if self.rate is not None and self.rate <= 0:
            raise UsageError(f"--rate must be positive, got {self.rate}")
        if self.stop_timeout < 0:
            raise UsageError(f"--stop-timeout must not be negative, got {self.stop_timeout}")
        caps = [r.max_connections for r in self.smtp.effective_relays]
        if self.sender == "smtp" and self.mode == "threads" and None not in caps \
                and sum(c or 0 for c in caps) < self.threads_per_actor:
            # Each sending thread keeps a connection of its own for as long as it sends.
            raise UsageError(
                f"--threads-per-actor {self.threads_per_actor} is more than the relays' "
                f"max_connections allow ({' + '.join(map(str, caps))}): in --mode threads each "
                "thread keeps its own connection; use fewer threads or --mode async")

    @property
    def concurrency(self) -> int:
        """Concurrent sends per actor."""
        return self.threads_per_actor if self.mode == "threads" else self.concurrency_per_actor

    @property
    def total_concurrency(self) -> int:
        return self.actors * self.concurrency


@dataclass(frozen=True, kw_only=True)
class CampaignConfig:
    """One run of a campaign: where the recipients are, where the run writes, how it sends."""

    input: str | None = None  # None: the embedded default (a generated 1M-row file)
    campaign: str | None = None  # None: derived from the input's name and today's date
    runs_dir: str = "runs"
    data_dir: str = "data"
    default_rows: int = 1_000_000
    suppress: str | None = None
    restart: bool = False
    retry_failed: bool = False
    # The load settles the list in waves of input rows in input order, each twice the one
    # before, and sends each wave while the next one loads (load_stage.py); 0: in one wave.
    wave_rows: int = 1_000_000
    address: str | None = None  # Ray address; None: RAY_ADDRESS or a local Ray
    num_cpus: int | None = None  # logical CPUs for a local Ray
    dashboard: bool = True
    timeline: str | None = None
    dry_run: int | None = None
    charts: bool = True
    verbose: bool = False  # Ray's own log lines on the console too
    # Seconds a dead holder's lease on the campaign outlives its last heartbeat (lease.py).
    lease_ttl: float = 10.0
    send: SendConfig = field(default_factory=SendConfig)

    def __post_init__(self) -> None:
        if self.campaign is not None:
            check_campaign_name(self.campaign)
        if self.dry_run is not None and self.dry_run < 1:
            raise UsageError(f"--dry-run must be at least 1, got {self.dry_run}")
        if self.wave_rows < 0:
            raise UsageError(f"--wave-rows must not be negative, got {self.wave_rows}")
        if self.lease_ttl < 1:
            raise UsageError(f"--lease-ttl must be at least 1 second, got {self.lease_ttl}")


def check_campaign_name(name: str) -> str:
    """A campaign name becomes a folder under runs/: keep it a single plain path segment."""
    if not _CAMPAIGN_NAME.match(name) or name in {".", ".."}:
        raise UsageError(
            f"--campaign {name!r} is not a plain name: use letters, digits, '.', '_' or '-' "
            "(no '/' or '..'), starting with a letter or digit"
        )
    return name
