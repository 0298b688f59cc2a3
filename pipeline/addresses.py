"""Vectorised email-address checks in polars: one reason string per invalid address, else null.

Why not `email-validator` per row: at about 30 µs an address it costs 30 s of CPU per 1M rows;
these expressions run in the polars engine at well under a second for 1M rows (measured in
scripts/bench_validation.py).  Rules follow RFC 5321/5322 (dot-atom or quoted local part,
length limits) and RFC 6531 (UTF-8 local parts and internationalised domains are allowed).
"""

from __future__ import annotations

import polars as pl

MAX_ADDRESS = 254  # RFC 5321 path limit (256) minus the angle brackets
MAX_LOCAL = 64
MAX_DOMAIN = 253
MAX_LABEL = 63

# atext of RFC 5322, widened to any non-ASCII character for RFC 6531 (SMTPUTF8).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x{80}-\x{10FFFF}]"
_DOT_ATOM = rf"^{_ATEXT}+(\.{_ATEXT}+)*$"
# A quoted string: printable ASCII except \ and ", or a backslash pair; non-ASCII allowed.
_QUOTED = r'^"([\x20\x21\x23-\x5B\x5D-\x7E\x{80}-\x{10FFFF}]|\\[\x20-\x7E])*"$'
# A domain label: letters/digits/hyphen (or any non-ASCII, an IDN U-label), no edge hyphen.
_LABEL = r"[A-Za-z0-9\x{80}-\x{10FFFF}]([A-Za-z0-9\-\x{80}-\x{10FFFF}]*[A-Za-z0-9\x{80}-\x{10FFFF}])?"
_DOMAIN = rf"^{_LABEL}(\.{_LABEL})+$"
_CONTROL = r"[\x00-\x1F\x7F]"


def split_address(email: pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    """(local part, domain), split at the last '@' (a quoted local part may hold '@')."""
    at = email.str.find("@[^@]*$")
    local = email.str.slice(0, at)
    domain = email.str.slice(at + 1)
    return local, domain


def invalid_reason(email: pl.Expr) -> pl.Expr:
    """Why `email` is not a deliverable address, or null when it is. `email` is already trimmed."""
    local, domain = split_address(email)
    quoted = local.str.contains(_QUOTED)
    unquoted_ats = email.str.replace_all(r'"([^"\\]|\\.)*"', "").str.count_matches("@")
    labels_too_long = domain.str.split(".").list.eval(
        pl.element().str.len_bytes() > MAX_LABEL).list.any()
    return (
        pl.when(email.is_null() | (email == "")).then(pl.lit("empty address"))
        .when(email.str.contains(_CONTROL)).then(pl.lit("control character (CR/LF/tab/NUL) in address"))
        .when(email.str.contains(r"\s")).then(pl.lit("whitespace in address"))
        .when(~email.str.contains("@")).then(pl.lit("no @ in address"))
        .when(unquoted_ats > 1).then(pl.lit("more than one @ in address"))
        .when(email.str.len_bytes() > MAX_ADDRESS).then(pl.lit(f"address longer than {MAX_ADDRESS} bytes"))
        .when(local == "").then(pl.lit("empty local part"))
        .when(local.str.len_bytes() > MAX_LOCAL).then(pl.lit(f"local part longer than {MAX_LOCAL} bytes"))
        .when(~(local.str.contains(_DOT_ATOM) | quoted))
        .then(pl.lit("local part is not a dot-atom or quoted string"))
        .when(domain == "").then(pl.lit("empty domain"))
        .when(domain.str.len_bytes() > MAX_DOMAIN).then(pl.lit(f"domain longer than {MAX_DOMAIN} bytes"))
        .when(~domain.str.contains(r"\.")).then(pl.lit("domain has no dot"))
        .when(labels_too_long).then(pl.lit(f"domain label longer than {MAX_LABEL} bytes"))
        .when(~domain.str.contains(_DOMAIN)).then(pl.lit("domain is not a valid host name"))
        .otherwise(pl.lit(None, pl.String))
    )


def normalise(email: pl.Expr) -> pl.Expr:
    """The dedupe key: the local part as written (it is case-sensitive by RFC), the domain lowered."""
    local, domain = split_address(email)
    return pl.when(email.str.contains("@")).then(
        pl.concat_str([local, pl.lit("@"), domain.str.to_lowercase()])
    ).otherwise(email)


def check_python(address: str) -> str | None:
    """The same rules for one address in plain Python (for callers outside a frame, e.g. --from)."""
    frame = pl.DataFrame({"e": [address]}, schema={"e": pl.String})
    return frame.select(invalid_reason(pl.col("e")))["e"][0]  # type: ignore[no-any-return]
