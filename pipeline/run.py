"""`python -m pipeline.run`: the same command as `bulkmail` (cli.py).

    python -m pipeline.run --actors 8 --threads-per-actor 100
"""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m pipeline.run"))
