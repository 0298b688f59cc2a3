"""How long Ctrl-C takes on the card's run: SIGINT N seconds into sending, time to exit.

    python scripts/stop_timing.py                 # 200,000 recipients, 8 × 100 threads, 0.5 s
    python scripts/stop_timing.py --resume        # then resume and count repeats

Prints the seconds from SIGINT to exit (target: under 5 s) and, with --resume, the repeats
found in the fake sender's own send log.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import generate  # noqa: E402


def sends(log: Path) -> list[int]:
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--actors", type=int, default=8)
    ap.add_argument("--threads-per-actor", type=int, default=100)
    ap.add_argument("--latency", type=float, default=0.5)
    ap.add_argument("--after", type=float, default=20.0, help="seconds into sending")
    ap.add_argument("--resume", action="store_true", help="resume and count repeats")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bulkmail-stop-"))
    generate.generate(a.rows).write_parquet(work / "in.parquet")
    log = work / "sends.log"
    args = [sys.executable, "-m", "pipeline.run", "--input", "in.parquet", "--campaign", "stop",
            "--actors", str(a.actors), "--threads-per-actor", str(a.threads_per_actor),
            "--latency", str(a.latency), "--send-log", str(log), "--no-dashboard", "--no-charts"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    while not sends(log):
        if proc.poll() is not None:
            print("the run ended before sending", file=sys.stderr)
            return 1
        time.sleep(0.1)
    time.sleep(a.after)
    sent_at_signal = len(sends(log))
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    code = proc.returncode
    took = time.perf_counter() - t0
    if code != 130:
        print(err, file=sys.stderr)
    print(f"{a.actors} actors × {a.threads_per_actor} threads, latency {a.latency} s, "
          f"{a.rows:,} rows: SIGINT after {a.after:.0f} s of sending ({sent_at_signal:,} sent), "
          f"exit {code} after {took:.2f} s")
    if a.resume:
        done = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True)
        ids = sends(log)
        print(f"resume exit {done.returncode}; {len(set(ids)):,} of {a.rows:,} recipients, "
              f"{len(ids) - len(set(ids))} repeats")
    return 0 if code == 130 else 1


if __name__ == "__main__":
    sys.exit(main())
