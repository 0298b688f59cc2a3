"""Is this checkout slower than an earlier commit? `bench_pipeline.py` run alternately from both.

    python scripts/bench_against.py 2b883c5                 # 6 pairs, 1M at 0.5 s, with a control
    python scripts/bench_against.py 69228e1^ --pairs 10 --no-control
    python scripts/bench_against.py HEAD~3 -- --rows 200000 # flags after -- go to bench_pipeline

On a shared 2-core VM the same command swings by a third within minutes, so one run of each says
nothing. This runs the checkout ("now") and a worktree of the commit ("ref") in pairs, the order
alternating (now-ref, ref-now, ...) so that a trend in the machine falls on both, over one input
file, and prints both medians, their ratio, and how often a run of now was slower than a run of
ref (0.5: indistinguishable). The control is a worktree of HEAD run as a third side: identical
code, so its gap to now is what the machine alone makes of the same comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worktree(commit: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(where),
                    commit], check=True, capture_output=True, text=True)
    return where


def run_once(tree: Path, work: Path, out: Path, extra: list[str]) -> dict[str, float]:
    """One bench_pipeline.py run from `tree` (its cwd, so its own pipeline package is imported,
    by the CLI and by Ray's workers); the numbers it wrote."""
    cmd = [sys.executable, "scripts/bench_pipeline.py", "--work-dir", str(work), "--json",
           str(out), *extra]
    done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    if done.returncode != 0 or not out.exists():
        raise SystemExit(f"run from {tree} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    rep = json.loads(out.read_text())
    return {"total": rep["report_total_s"], "first_send": rep["first_send_after_s"],
            **{f"stage {k}": v for k, v in rep["stages_s"].items()}}


def superiority(a: list[float], b: list[float]) -> float:
    """P(a run of `a` took longer than a run of `b`), ties half: 0.5 means no difference."""
    wins = sum((x > y) + 0.5 * (x == y) for x in a for y in b)
    return wins / (len(a) * len(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ref", help="the commit to compare against (anything git rev-parse takes)")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--no-control", action="store_true", help="no worktree of HEAD as a third side")
    ap.add_argument("--keep", action="store_true", help="keep the worktrees and the runs' JSON")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    a.extra = argv[cut + 1:]  # bench_pipeline.py's flags

    tmp = Path(tempfile.mkdtemp(prefix="bulkmail-against-"))
    work = tmp / "work"  # one input file, made by the first run, read by every side
    sides = {"now": ROOT, "ref": worktree(a.ref, tmp / "ref")}
    if not a.no_control:
        sides["control"] = worktree("HEAD", tmp / "control")
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "pipeline"],
                               capture_output=True, text=True).stdout.strip()
        if dirty:  # the control runs HEAD: it is the same code only for a clean pipeline/
            print("note: pipeline/ has uncommitted changes, which the control does not run")
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in sides}
    try:
        for i in range(a.pairs):
            order = list(sides) if i % 2 == 0 else list(reversed(sides))
            for side in order:
                r = run_once(sides[side], work, tmp / f"{side}-{i}.json", a.extra)
                runs[side].append(r)
                print(f"pair {i + 1}: {side:<7} total {r['total']:6.2f} s   first email after "
                      f"{r['first_send']:5.2f} s", flush=True)
    finally:
        if not a.keep:
            for side, tree in sides.items():
                if side != "now":
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                    str(tree)], capture_output=True)
            shutil.rmtree(tmp, ignore_errors=True)

    now = [r["total"] for r in runs["now"]]
    print(f"\nrun totals (load to report, s), {a.pairs} pairs, order alternating:")
    for side, rs in runs.items():
        totals = [r["total"] for r in rs]
        print(f"  {side:<7} median {statistics.median(totals):6.2f}   "
              + " · ".join(f"{t:.2f}" for t in totals))
    for side in [s for s in runs if s != "now"]:
        other = [r["total"] for r in runs[side]]
        ratio = statistics.median(now) / statistics.median(other)
        print(f"now against {side:<7}: {ratio:.3f} of its median time; a run of now was slower "
              f"than a run of {side} with probability {superiority(now, other):.2f}")
    stages = sorted({k for rs in runs.values() for r in rs for k in r if k.startswith("stage")})
    print("median stage (s): " + "   ".join(
        f"{k[6:]} " + "/".join(f"{statistics.median(r[k] for r in rs):.2f}"
                               for rs in runs.values()) for k in stages)
          + f"   ({'/'.join(runs)})")


if __name__ == "__main__":
    main()
