"""Synthetic recipients: the embedded default input and the dirty lists the tests and demos use.

Plain numpy and polars; nothing here knows about Ray or the ledger.
"""

from __future__ import annotations

import os

import numpy as np
import polars as pl

from .errors import UsageError

_FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Linus", "Guido",
          "Ken", "Dennis", "Frances", "Radia", "Niklaus", "Leslie", "Sophie", "Zoë", "José",
          "Björn", "Ngozi", "Priya", "Wei", "Yuki", "Olúwa"]
_LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Hamilton", "Torvalds",
         "van Rossum", "Thompson", "Ritchie", "Allen", "Perlman", "Wirth", "Lamport", "Wilson",
         "Müller", "García", "Øster", "Okafor", "Sharma", "Zhang", "Tanaka", "Adé"]
_CITIES = ["Lisbon", "Lagos", "Lima", "Leeds", "Lyon", "Łódź", "Linz", "Ljubljana", "Lahore",
           "Luanda", "Lund", "Lucknow"]
_PLANS = ["free", "pro", "team", "enterprise"]
_DOMAINS = ["example.com", "example.org", "example.net", "mail.example", "post.example"]


# Kinds of bad address the generator plants, one reason class each (see addresses.py).
BAD_ADDRESSES: list[str | None] = [
    "", None, "no-at-sign.example.com", "two@@example.com", "sp ace@example.com",
    "new\nline@example.com", "x@example.com\r\nBcc: victim@example.com", "dot.@example.com",
    "x@nodot", "a" * 65 + "@example.com", "x@" + "d" * 64 + ".com", "x@-bad-.com",
    "zero\u200bwidth@example.com", "x@[192.0.2.1]", "x@exa_mple.com"]
# Names that would add a header if they reached one unchecked (CR, LF, and the separators
# Python's str.splitlines() also breaks on).
INJECTION_NAMES = ["Eve\r\nBcc: victim@example.com", "Mallory\nX-Injected: yes",
                   "Trudy\rSubject: spoofed", "Zed\u2028Bcc: victim@example.com",
                   "Oscar\x0bReply-To: victim@example.com"]
# Valid internationalised / unusual addresses (RFC 6531, quoted local parts): {} is the row id.
INTL_ADDRESSES = ["zoë.{}@bücher.example", "用户{}@例子.测试", '"first last {}"@example.com',
                  "josé+{}@correo.example", "δοκιμή{}@παράδειγμα.δοκιμή", "{}😀@emoji.example",
                  '"at@sign {}"@example.org', "o'neil.{}@xn--bcher-kva.example"]
# Names that are fine but unusual: emoji, non-Latin scripts, very long, null.
INTL_NAMES: list[str | None] = ["Zoë 😀 Ünïcødé", "山田 太郎", "Ωmega " * 60, None, "Ngọc Ánh"]
PLANTED = ("clean", "invalid", "duplicate", "injection", "intl")


def generate(rows: int, *, seed: int = 0, invalid_fraction: float = 0.0,
             duplicate_fraction: float = 0.0, injection_fraction: float = 0.0,
             intl_fraction: float = 0.0, label: bool = False) -> pl.DataFrame:
    """`rows` synthetic recipients (id, email, name, city, plan, signup_year); 1M in about 1 s.

    Mixed in, each over its own randomly chosen rows (row 0 always stays clean):
    - `invalid_fraction`: a bad address (BAD_ADDRESSES, cycled);
    - `duplicate_fraction`: an earlier clean row's address with its domain upper-cased (every
      other one also padded with spaces), which must still count as the same address;
    - `injection_fraction`: a valid address but a name holding CR/LF (INJECTION_NAMES);
    - `intl_fraction`: a valid internationalised or quoted address and an unusual name.
    `label=True` adds `planted` (the kind above, or "clean") and `planted_of` (for a duplicate,
    the id of the row it repeats): what a load must conclude, for tests and demos.
    """
    fractions = (("--invalid-fraction", invalid_fraction),
                 ("--duplicate-fraction", duplicate_fraction),
                 ("--injection-fraction", injection_fraction), ("--intl-fraction", intl_fraction))
    for flag, value in fractions:
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"{flag} must be within [0, 1], got {value}")
    if sum(v for _, v in fractions) > 1.0:
        raise UsageError("the --*-fraction flags together must not exceed 1")
    if rows < 0:
        raise UsageError(f"--rows must not be negative, got {rows}")
    rng = np.random.default_rng(seed)
    first = rng.integers(0, len(_FIRST), rows)
    last = rng.integers(0, len(_LAST), rows)
    idx = np.arange(rows, dtype=np.int64)
    df = pl.DataFrame({
        "id": idx,
        "first": pl.Series(_FIRST, dtype=pl.String).gather(first),
        "last": pl.Series(_LAST, dtype=pl.String).gather(last),
        "domain": pl.Series(_DOMAINS, dtype=pl.String).gather(rng.integers(0, len(_DOMAINS), rows)),
        "city": pl.Series(_CITIES, dtype=pl.String).gather(rng.integers(0, len(_CITIES), rows)),
        "plan": pl.Series(_PLANS, dtype=pl.String).gather(rng.integers(0, len(_PLANS), rows)),
        "signup_year": rng.integers(2010, 2027, rows).astype(np.int16),
    })
    df = df.with_columns(
        email=pl.concat_str([pl.lit("user"), pl.col("id").cast(pl.String), pl.lit("@"), pl.col("domain")]),
        name=pl.concat_str([pl.col("first"), pl.lit(" "), pl.col("last")]),
    ).select("id", "email", "name", "city", "plan", "signup_year")
    # Row 0 is never chosen, so every duplicate has an earlier clean row to repeat.
    room = max(rows - 1, 0)
    counts = [min(int(rows * f), room) for _, f in fractions]
    planted = np.zeros(rows, dtype=np.int8)  # index into PLANTED
    planted_of = np.full(rows, -1, dtype=np.int64)
    if any(counts):
        chosen = rng.permutation(np.arange(1, rows, dtype=np.int64))
        emails = df["email"].to_numpy().astype(object)
        names = df["name"].to_numpy().astype(object)
        bounds = np.cumsum([0, *counts])
        bad, dup, inj, intl = (np.sort(chosen[bounds[i]:bounds[i + 1]]) for i in range(4))
        planted[bad], planted[dup], planted[inj], planted[intl] = 1, 2, 3, 4
        emails[bad] = [BAD_ADDRESSES[i % len(BAD_ADDRESSES)] for i in range(bad.size)]
        names[inj] = [INJECTION_NAMES[i % len(INJECTION_NAMES)] for i in range(inj.size)]
        emails[intl] = [INTL_ADDRESSES[i % len(INTL_ADDRESSES)].format(r)
                        for i, r in enumerate(intl.tolist())]
        names[intl] = [INTL_NAMES[i % len(INTL_NAMES)] for i in range(intl.size)]
        if dup.size:
            clean = idx[planted == 0]
            sources = clean[np.searchsorted(clean, dup) - 1]  # the last clean row before
            planted_of[dup] = sources
            for n, (row, src) in enumerate(zip(dup.tolist(), sources.tolist(), strict=True)):
                local, _, domain = str(emails[src]).rpartition("@")
                emails[row] = f"{local}@{domain.upper()}" if n % 2 else f"  {local}@{domain.upper()} "
        df = df.with_columns(email=pl.Series(emails.tolist(), dtype=pl.String),
                             name=pl.Series(names.tolist(), dtype=pl.String))
    if label:
        df = df.with_columns(
            planted=pl.Series(PLANTED, dtype=pl.String).gather(planted),
            planted_of=pl.when(pl.lit(pl.Series(planted_of)) >= 0).then(pl.lit(pl.Series(planted_of))))
    return df


def default_input_path(data_dir: str, rows: int) -> str:
    return os.path.join(data_dir, f"recipients-{rows}.parquet")


def default_input(data_dir: str, rows: int, seed: int = 0) -> str:
    """The embedded default: a generated file, made once and cached under `data_dir`."""
    path = default_input_path(data_dir, rows)
    if not os.path.exists(path):
        os.makedirs(data_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        generate(rows, seed=seed).write_parquet(tmp)
        os.replace(tmp, path)
    return path
