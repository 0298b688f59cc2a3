"""Starting or joining Ray for one run, and stopping what this run started.

A run either joins a cluster (`--address`, or `$RAY_ADDRESS` as `ray job submit` sets it) or
starts its own local Ray, which serves this machine only (127.0.0.1) and is stopped at the end.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
import socket
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from . import storage
from .config import CampaignConfig, SendConfig
from .errors import UsageError


def cluster_address(config: CampaignConfig) -> str | None:
    return config.address or os.environ.get("RAY_ADDRESS") or None


def prepare_import(config: CampaignConfig) -> None:
    """Environment Ray reads when it is imported; call before `import ray`. A variable the user
    set is left as it is."""
    address = cluster_address(config)
    if address is None or _on_loopback(_resolved(address)):
        # A Ray started here serves this machine only: keep its GCS, raylet and workers on
        # 127.0.0.1 rather than the primary interface's address. Ray reads this at import
        # (ray_constants.ENABLE_RAY_CLUSTER), so it must be set before `import ray`. A driver
        # joining a head on 127.0.0.1 needs it too: without it the driver takes the primary
        # interface for its node's address and retries the GCS there for over 10 minutes,
        # printing nothing (docs/ray-notes.md). It also joins a head on the primary interface.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address is None or _token_at_hand():
        # Ray 2.60 turns token authentication on for a local Ray and warns that it did; saying
        # so explicitly keeps it on and the console quiet (the dashboard then asks for the
        # token: `dashboard_access` says how to get it). A driver joining a cluster presents
        # its token only in this mode (without it, `ray.init` fails after ~20 s); a cluster
        # without authentication accepts it as well.
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def _host_port(address: str) -> tuple[str, int] | None:
    """The host and port of a Ray address (`host:port`, `ray://host:port`, `[::1]:port`);
    None for "auto" and other forms Ray resolves itself (a bare IPv6 address among them)."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit() or (":" in host and not host.startswith("[")):
        return None
    return host.strip("[]"), int(port)


def _resolved(address: str) -> str:
    """`auto` as Ray resolves it: the Ray last started on this machine, from the file `ray
    start` writes (Ray reads the same one); any other address as it is."""
    if address != "auto":
        return address
    path = os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster")
    try:
        with open(path) as f:
            return f.read().strip() or address
    except OSError:
        return address


def _on_loopback(address: str) -> bool:
    hp = _host_port(address)
    return hp is not None and (hp[0] in ("localhost", "::1") or hp[0].startswith("127."))


def _flag(config: CampaignConfig) -> str:
    """Where the address came from, as the user gave it."""
    return "--address" if config.address else "$RAY_ADDRESS"


def check_address(config: CampaignConfig, timeout: float = 5.0) -> None:
    """Refuse (UsageError) a cluster address this run cannot join, before Ray is imported: an
    HTTP address (the dashboard's, which `ray job submit` takes), and an address where nothing
    listens, which `ray.init` would retry for minutes, printing nothing (measured: still
    waiting after 200 s). A port that accepts but is not Ray's is left to Ray (it too waited
    more than 90 s here)."""
    address = cluster_address(config)
    if address is None:
        return
    scheme = address.split("://", 1)[0].lower() if "://" in address else None
    if scheme not in (None, "ray"):
        raise UsageError(f"{_flag(config)} {address}: a run joins Ray's own address "
                         "(host:6379 or ray://host:10001), not the dashboard's; that one is for "
                         "`ray job submit` (unset RAY_ADDRESS, or give the cluster's address)")
    hp = _host_port(address)
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=timeout).close()
    except OSError as exc:
        raise UsageError(f"{_flag(config)} {address}: no Ray cluster answers there "
                         f"({exc.strerror or exc}); start it (`ray start --head`) or fix the "
                         "address") from None


def _token_file() -> str:
    """Where Ray reads its auth token from, when not from $RAY_AUTH_TOKEN itself."""
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")


def _token_at_hand() -> bool:
    """A Ray auth token this process can present (Ray's own places for it)."""
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or os.path.exists(_token_file())


@dataclass(frozen=True, kw_only=True)
class RaySession:
    started: bool  # this run started or joined Ray (and so shuts its connection down)
    dashboard_url: str | None  # http://host:port, when a dashboard runs
    session_dir: str | None  # Ray's own logs for this session (logs/ below it)

    def stop(self) -> None:
        # Collect the run's garbage while Ray is up: a Ray Data iterator or executor left in a
        # reference cycle is shut down by its __del__, which talks to Ray. Collected after
        # ray.shutdown, by whichever thread's allocation runs the collector (the report's,
        # drawing charts), it ended the process with code 1 ("The core worker has already
        # been shutdown"): seen once in the suite, after a run had finished and folded.
        gc.collect()
        if self.started:
            import ray
            ray.shutdown()


def start(config: CampaignConfig, send: SendConfig, *, verbose: bool = False) -> RaySession:
    """Start or join Ray. The caller's SIGINT/SIGTERM handlers survive it."""
    prepare_import(config)
    import ray
    if ray.is_initialized():
        return RaySession(started=False, dashboard_url=None, session_dir=None)
    address = cluster_address(config)
    # address=None would not mean "start one": ray.init then joins any Ray already running on
    # this machine (`ray start`, or another run's), and num_cpus makes that fail. "local"
    # always starts this run's own.
    kwargs: dict[str, Any] = dict(
        address=address or "local", logging_level=logging.WARNING,
        # Worker and actor output stays in Ray's session logs unless asked for: forwarded to
        # the driver it would interleave with the progress line.
        log_to_driver=verbose,
        include_dashboard=config.dashboard if address is None else None)
    if address is None:
        # Sending is I/O-bound: senders ask for a fraction of a CPU, and Ray is given at least
        # enough logical CPUs for all of them plus one for Ray Data's own tasks (8 actors at
        # 1 CPU each never start on 2 cores; docs/ray-notes.md).
        need = math.ceil(send.actors * send.cpus_per_actor) + 1
        kwargs["num_cpus"] = config.num_cpus or max(os.cpu_count() or 1, need)
        # The load's task workers are needed again by the fold at the end: Ray kills idle
        # workers beyond its soft limit (one per CPU) after 1 s, and starting one again costs
        # 1-2 s on 2 cores (interpreter, polars, pyarrow); the fold of a 1M run took 3.6 s
        # instead of 0.5 s. A minute keeps them across a run's send stage on a small machine.
        system: dict[str, Any] = {"idle_worker_killing_time_threshold_ms": 60_000}
        if not send.metrics:
            system["enable_metrics_collection"] = False
        kwargs["_system_config"] = system
    # ray.init installs the core worker's own SIGTERM handler (it logs and dies with code 15),
    # which would skip the caller's graceful stop: put the caller's handlers back.
    saved = ({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
             if threading.current_thread() is threading.main_thread() else {})
    try:
        ctx = ray.init(**{k: v for k, v in kwargs.items() if v is not None})
    except (ConnectionError, ValueError) as exc:
        # A join Ray refuses, or an address it cannot use: nothing was read, sent or recorded.
        if address is None:
            raise
        status = "" if address.startswith("ray://") else f" (`ray status --address {address}`)"
        raise UsageError(
            f"{_flag(config)} {address}: cannot join a Ray cluster there ({exc}); check that it "
            f"runs{status} and, if it wants a token, that this machine has it "
            "(~/.ray/auth_token or $RAY_AUTH_TOKEN)") from None
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)
    _private_token()
    from ray.data import DataContext
    data = DataContext.get_current()
    data.enable_progress_bars = False
    url = getattr(ctx, "dashboard_url", None)
    return RaySession(started=True, dashboard_url=f"http://{url}" if url else None,
                      session_dir=_session_dir())


def dashboard_access(session: RaySession) -> str | None:
    """How to open the dashboard, token authentication included (two short lines)."""
    if not session.dashboard_url:
        return None
    token = os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"
    return (f"Ray dashboard: {session.dashboard_url}\n"
            f"  sign in with the token `ray get-auth-token` prints (also in {token})")


def _private_token() -> None:
    """Ray 2.60 writes its token file readable by every local user (0644); whoever reads it
    can submit jobs to this Ray. Keep it to its owner."""
    path = _token_file()
    try:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError:
        pass  # no token file (a joined cluster's token comes from elsewhere)


def _session_dir() -> str | None:
    try:
        import ray
        node: Any = ray._private.worker.global_worker.node
        return str(node.get_session_dir_path())
    except Exception:  # noqa: BLE001 - a joined cluster's driver may not know it
        return None


def this_node() -> Any:
    """A scheduling strategy that pins an actor to the driver's node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def log_file(run_dir: str, campaign: str, run_id: str) -> str:
    """Where Ray's own console output goes: the run directory, or for a run directory in
    object storage, the local temporary directory."""
    name = f"ray-{run_id}.log"
    if storage.is_local(run_dir):
        logs = os.path.join(storage.resolve(run_dir)[1], "logs")
        os.makedirs(logs, exist_ok=True)
        return os.path.join(logs, name)
    return os.path.join(tempfile.gettempdir(), f"bulkmail-{campaign}-{name}")
