"""Write a synthetic recipient list as Parquet, optionally dirty, for demos, tests and benchmarks.

    python scripts/generate_recipients.py --rows 1000000 --out data/recipients.parquet
    python scripts/generate_recipients.py --rows 10000 --out dirty.parquet \\
        --invalid-fraction 0.05 --duplicate-fraction 0.05 --injection-fraction 0.01 \\
        --intl-fraction 0.05 --label
    python scripts/generate_recipients.py --rows 1000000 --files 16 --out data/recipients/

A thin command line over `pipeline.generate.generate`; see its docstring for what each kind
of planted row looks like. Exit code 2 with one line on a bad flag.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import generate, storage  # noqa: E402
from pipeline.errors import UsageError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"generate_recipients: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same file)")
    p.add_argument("--out", required=True, help="output .parquet file, or a directory with --files")
    p.add_argument("--files", type=int, default=1,
                   help="split into this many part-NNNNN.parquet files under --out (a directory)")
    p.add_argument("--invalid-fraction", type=float, default=0.0, help="share of bad addresses")
    p.add_argument("--duplicate-fraction", type=float, default=0.0,
                   help="share of rows repeating an earlier address (domain case and padding changed)")
    p.add_argument("--injection-fraction", type=float, default=0.0,
                   help="share of valid addresses whose name holds CR/LF (header injection)")
    p.add_argument("--intl-fraction", type=float, default=0.0,
                   help="share of valid internationalised or quoted addresses with unusual names")
    p.add_argument("--label", action="store_true",
                   help="add columns 'planted' (the row's kind) and 'planted_of' (a duplicate's "
                   "original id): the fate a load must reach")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.files < 1:
            raise UsageError(f"--files must be at least 1, got {args.files}")
        t0 = time.perf_counter()
        frame = generate.generate(
            args.rows, seed=args.seed, invalid_fraction=args.invalid_fraction,
            duplicate_fraction=args.duplicate_fraction, injection_fraction=args.injection_fraction,
            intl_fraction=args.intl_fraction, label=args.label)
        if args.files == 1 and not storage.is_dir(args.out):
            parent = os.path.dirname(os.path.abspath(args.out))
            if not storage.is_uri(args.out):
                os.makedirs(parent, exist_ok=True)
            storage.write_table(frame.to_arrow(), args.out)
            written = [args.out]
        else:
            storage.makedirs(args.out)
            per = max(1, math.ceil(frame.height / args.files))
            written = []
            for i in range(args.files):
                path = storage.join(args.out, f"part-{i:05d}.parquet")
                storage.write_table(frame.slice(i * per, per).to_arrow(), path)
                written.append(path)
    except UsageError as exc:
        sys.stderr.write(f"generate_recipients: error: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"generate_recipients: error: --out {args.out}: {exc.strerror or exc}\n")
        return 2
    where = written[0] if len(written) == 1 else f"{len(written)} files under {args.out}"
    print(f"wrote {frame.height:,} rows to {where} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
