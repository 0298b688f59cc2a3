"""The `bulkmail` command (and `python -m pipeline.run`): parse flags, build a config, call one
library function, map the library's exceptions to one line and an exit code.

    bulkmail [run] --actors 8 --threads-per-actor 100     send a campaign (resumes by name)
    bulkmail status CAMPAIGN [--json]                      how a campaign is doing, from its ledger
    bulkmail export CAMPAIGN --status failed --format csv  who received what

Exit codes: 0 done; 1 finished with failed recipients or an unexpected error; 2 a usage error
(bad flag, file or column, or a campaign another run holds), before Ray starts; 3 another run
took the campaign over mid-run; 130 stopped by a signal.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any

from . import storage
from .console import Console, ProgressPrinter
from .errors import BulkmailError, CampaignInterrupted, UsageError
from .flags import EXIT_USAGE, Parser, build_parser, config_from_args

EXIT_OK, EXIT_FAILED, EXIT_LEASE_LOST, EXIT_INTERRUPTED = 0, 1, 3, 130
COMMANDS = ("run", "status", "export")


def main(argv: Sequence[str] | None = None, *, prog: str = "bulkmail") -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    console = Console()
    if args and args[0] in ("status", "export"):
        return _inspect(args, console, prog)
    if args and args[0] == "run":
        args = args[1:]
    return run(args, console, prog)


# --------------------------------------------------------------------------- run

def run(argv: list[str], console: Console, prog: str) -> int:
    try:
        args = build_parser(prog).parse_args(argv)
        config = config_from_args(args)
    except UsageError as exc:
        console.error(f"bulkmail: error: {exc}")
        return EXIT_USAGE

    from .campaign import run_campaign  # the library: only once the flags are good
    from .hooks import Hooks
    from .lease import LeaseLost
    printer = ProgressPrinter(args.progress_every, console.out)

    def info(text: str) -> None:
        printer.end()
        for line in text.splitlines():
            console.line(line)
    hooks = Hooks(on_progress=printer, on_info=info, before_ray=console.redirect)
    _install_signals(hooks.stop, console)
    try:
        rep = run_campaign(config, hooks=hooks)
    except UsageError as exc:
        printer.end()
        console.error(f"bulkmail: error: {exc}")
        return EXIT_USAGE
    except CampaignInterrupted as exc:
        printer.end()
        _summary(exc.report, console)
        resume = " ".join(a for a in argv if a != "--restart")
        campaign = getattr(exc.report, "campaign", None)
        if campaign and "--campaign" not in resume:
            resume += f" --campaign {campaign}"
        console.error(f"bulkmail: {exc}. Resume with: {prog} {resume}".rstrip())
        return EXIT_INTERRUPTED
    except LeaseLost as exc:
        printer.end()
        console.error(f"bulkmail: {exc}")
        return EXIT_LEASE_LOST
    except BulkmailError as exc:
        printer.end()
        console.error(f"bulkmail: error: {exc}")
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - a bug: one line here, the traceback in the log
        printer.end()
        traceback.print_exc()  # to fd 2: the log file once Ray started, else the terminal
        where = f" (traceback in {console.log_file})" if console.log_file else ""
        console.error(f"bulkmail: unexpected error: {type(exc).__name__}: {exc}{where}")
        return EXIT_FAILED
    printer.end()
    if not hasattr(rep, "send"):  # a dry run: the info line already says where the .eml went
        return EXIT_OK
    _summary(rep, console)
    if not rep.counts.reconciled:  # type: ignore[union-attr]
        console.error("bulkmail: counts do not reconcile with the input; see report.json")
        return EXIT_FAILED
    return EXIT_OK


def _summary(rep: Any, console: Console) -> None:
    if rep is None or not hasattr(rep, "counts"):
        return
    from .report import summary_rows
    rows = summary_rows(rep)
    width = max(len(k) for k, _ in rows)
    console.line("")
    for k, v in rows:
        console.line(f"  {k:<{width}}  {v}")
    console.line("")
    console.line(f"  ledger: {storage.shown(rep.run_dir)}/ledger.parquet")
    console.line(f"  report: {storage.shown(rep.run_dir)}/report.md")
    if rep.log_file:
        console.line(f"  Ray's log: {storage.shown(rep.log_file)}")


def _install_signals(stop: threading.Event, console: Console) -> None:
    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            console.error("\nbulkmail: second signal, exiting now (the ledger stays readable)")
            os._exit(EXIT_INTERRUPTED)
        stop.set()
        console.error(f"\nbulkmail: {signal.Signals(signum).name}: stopping; sends under way "
                      "finish and are recorded (signal again to exit at once)")
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


# --------------------------------------------------------------------------- status, export

def inspect_parser(prog: str) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description="Read a campaign's ledger: how it is doing, who got what.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    s = sub.add_parser("status", help="counts, rate, ETA, top failure reasons, lease holder")
    e = sub.add_parser("export", help="the latest outcome per recipient, as CSV or Parquet")
    for q in (s, e):
        q.add_argument("campaign", help="campaign name (under --runs-dir), a run directory, "
                       "or a URI (s3://...)")
        q.add_argument("--runs-dir", default="runs", help="where campaigns live")
    s.add_argument("--json", action="store_true", help="print JSON for scripts")
    e.add_argument("--status", action="append", dest="statuses", metavar="STATUS",
                   help="only these outcomes (repeatable): sent, failed, invalid, duplicate, "
                   "suppressed; default: all")
    e.add_argument("--format", choices=["csv", "parquet"], default="csv", help="output format")
    e.add_argument("--output", "-o", default="-",
                   help="file to write; '-' (the default) writes CSV to stdout")
    return p


def _inspect(argv: list[str], console: Console, prog: str) -> int:
    args = inspect_parser(prog).parse_args(argv)
    from . import export, status
    try:
        run_dir = status.resolve_run_dir(args.campaign, runs_dir=args.runs_dir)
        if args.command == "status":
            st = status.campaign_status(run_dir)
            if args.json:
                console.line(json.dumps(st.to_json(), indent=2, default=str))
            else:
                for line in st.lines():
                    console.line(line)
            return EXIT_OK
        if args.output == "-" and args.format != "csv":
            raise UsageError("--format parquet needs --output FILE (Parquet is not for a terminal)")
        dest: Any = args.output
        if args.output == "-":
            console.out.flush()
            dest = getattr(console.out, "buffer", None)
            if dest is None:
                raise UsageError("--output -: standard output is not a byte stream; name a file")
        n = export.export(run_dir, dest, statuses=args.statuses, format=args.format)
        if args.output != "-":
            console.error(f"bulkmail: wrote {n:,} rows to {args.output}")
        return EXIT_OK
    except UsageError as exc:
        console.error(f"bulkmail: error: {exc}")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
