"""Vectorised email-address checks in polars: one reason string per invalid address, else null.

Why not `email-validator` per row: measured on this machine (scripts/bench_validation.py, 2
cores) it costs about 25 µs an address, so about 25 s per 1M rows on one core, while these
expressions take well under a second for 1M rows in the polars engine.

Rules (RFC 5321/5322 syntax, widened by RFC 6531 for UTF-8), checked in this order, the first
failure being the reason:
- not null or empty;
- no control, format (zero-width, bidi), private-use or unassigned character, and no line or
  paragraph separator, anywhere: nothing that could end a header line or disguise an address;
- exactly one `@` outside a quoted local part (the address splits at the last `@`);
- no whitespace except inside a quoted local part (`"a b"@example.com` is valid);
- at most 254 bytes in all, 64 in the local part, 253 in the domain, 63 in a domain label
  (bytes of UTF-8; RFC 5321 4.5.3.1);
- the local part is a dot-atom (RFC 5322 atext, plus any non-ASCII character, no leading,
  trailing or double dot) or a non-empty quoted string;
- the domain is a host name of two labels or more: ASCII letters, digits and hyphens, or
  non-ASCII letters, marks and digits (an IDN U-label); no label starts or ends with a hyphen;
  the last label is not all digits. Address literals (`x@[192.0.2.1]`) are refused.

What is not checked: whether the domain exists (no DNS at load time; a bounce is a `failed`).
"""

from __future__ import annotations

import polars as pl

MAX_ADDRESS = 254  # RFC 5321 path limit (256) minus the angle brackets
MAX_LOCAL = 64
MAX_DOMAIN = 253
MAX_LABEL = 63

# Unicode classes use the regex crate's tables (polars); \p{Cs} does not exist in UTF-8 text.
_UNSAFE = r"[\p{Cc}\p{Cf}\p{Co}\p{Cn}\x{2028}\x{2029}]"
_CRLF = r"[\r\n]"
_SPACE = r"[\s\p{Z}]"
# atext of RFC 5322, widened to any non-ASCII character for RFC 6531 (SMTPUTF8); unsafe ones
# were refused before this runs. A combining mark may not open the local part.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x{80}-\x{10FFFF}]"
_ATEXT_FIRST = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x{80}-\x{10FFFF}&&[^\p{M}]]"
_DOT_ATOM = rf"^{_ATEXT_FIRST}{_ATEXT}*(\.{_ATEXT}+)*$"
# A quoted string: printable ASCII except \ and ", any non-ASCII, or a backslash pair.
_QUOTED = r'^"([\x20\x21\x23-\x5B\x5D-\x7E\x{80}-\x{10FFFF}]|\\[\x20-\x7E])+"$'
# A domain label: ASCII letters/digits/hyphens or non-ASCII letters/marks/digits, no edge hyphen.
_LCHAR = r"[A-Za-z0-9]|[\p{L}\p{M}\p{N}&&[^\x00-\x7F]]"
_LABEL = rf"(?:{_LCHAR})(?:(?:{_LCHAR}|-)*(?:{_LCHAR}))?"
_DOMAIN = rf"^{_LABEL}(?:\.{_LABEL})+$"
_NUMERIC_TLD = r"\.[0-9]+$"
_SPLIT = r"(?s)^(.*)@([^@]*)$"  # at the last '@': a quoted local part may hold '@'

REASON_EMPTY = "empty address"
REASON_CRLF = "CR or LF in address (header injection)"
REASON_UNSAFE = "control or invisible character in address"


def split_address(email: pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    """(local part, domain), split at the last '@'; both null when there is no '@'.

    A regex, not `str.find` + `str.slice`: find gives a byte offset and slice counts
    characters, which cut non-ASCII local parts in the wrong place.
    """
    return email.str.extract(_SPLIT, 1), email.str.extract(_SPLIT, 2)


def invalid_reason(email: pl.Expr, local: pl.Expr | None = None,
                   domain: pl.Expr | None = None) -> pl.Expr:
    """Why `email` is not a deliverable address, or null when it is. `email` is already trimmed.

    `local` and `domain` may be given as columns made by `split_address` (see `annotate`): the
    split is the costliest step, and polars does not share it between the branches below.
    """
    if local is None or domain is None:
        local, domain = split_address(email)
    quoted = local.str.contains(_QUOTED)
    # '@' in an unquoted local part is a second '@' (the domain never has one: split at the last).
    extra_at = ~quoted & local.str.contains("@", literal=True)
    spaced = (~quoted & local.str.contains(_SPACE)) | domain.str.contains(_SPACE)
    # Counted in characters: DNS limits the A-label (punycode), which UTF-8 bytes do not measure.
    label_too_long = domain.str.contains(rf"[^.]{{{MAX_LABEL + 1},}}")
    return (
        pl.when(email.is_null() | (email == "")).then(pl.lit(REASON_EMPTY))
        .when(email.str.contains(_CRLF)).then(pl.lit(REASON_CRLF))
        .when(email.str.contains(_UNSAFE)).then(pl.lit(REASON_UNSAFE))
        .when(local.is_null()).then(pl.lit("no @ in address"))
        .when(extra_at).then(pl.lit("more than one @ in address"))
        .when(spaced).then(pl.lit("whitespace in address (allowed only in a quoted local part)"))
        .when(email.str.len_bytes() > MAX_ADDRESS).then(pl.lit(f"address longer than {MAX_ADDRESS} bytes"))
        .when(local == "").then(pl.lit("empty local part"))
        .when(local.str.len_bytes() > MAX_LOCAL).then(pl.lit(f"local part longer than {MAX_LOCAL} bytes"))
        .when(~(quoted | local.str.contains(_DOT_ATOM)))
        .then(pl.lit("local part is not a dot-atom or quoted string"))
        .when(domain == "").then(pl.lit("empty domain"))
        .when(domain.str.len_bytes() > MAX_DOMAIN).then(pl.lit(f"domain longer than {MAX_DOMAIN} bytes"))
        .when(~domain.str.contains(".", literal=True)).then(pl.lit("domain has no dot"))
        .when(label_too_long).then(pl.lit(f"domain label longer than {MAX_LABEL} characters"))
        .when(~domain.str.contains(_DOMAIN)).then(pl.lit("domain is not a valid host name"))
        .when(domain.str.contains(_NUMERIC_TLD)).then(pl.lit("domain ends in an all-digit label"))
        .otherwise(pl.lit(None, pl.String))
    )


def trim(email: pl.Expr) -> pl.Expr:
    """Strip spaces and tabs (any Unicode space) at both ends; CR and LF stay, to be refused."""
    return email.str.replace_all(r"^[\t\p{Zs}]+|[\t\p{Zs}]+$", "")


def normalise(email: pl.Expr, local: pl.Expr | None = None,
              domain: pl.Expr | None = None) -> pl.Expr:
    """The dedupe key: the local part as written (it is case-sensitive by RFC), the domain lowered."""
    if local is None or domain is None:
        local, domain = split_address(email)
    return pl.when(local.is_not_null()).then(
        pl.concat_str([local, pl.lit("@"), domain.str.to_lowercase()])
    ).otherwise(email)


def annotate(frame: pl.LazyFrame, email: str, *, reason: str, key: str) -> pl.LazyFrame:
    """Add `reason` (invalid_reason) and `key` (normalise) for column `email`, splitting once."""
    parts = ("__bulkmail_local", "__bulkmail_domain")
    split = pl.col(email).str.extract_groups(_SPLIT).struct.rename_fields(list(parts))
    local, domain = pl.col(parts[0]), pl.col(parts[1])
    return (frame.with_columns(split.alias("__bulkmail_parts")).unnest("__bulkmail_parts")
            .with_columns(invalid_reason(pl.col(email), local, domain).alias(reason),
                          normalise(pl.col(email), local, domain).alias(key))
            .drop(*parts))


def check_python(address: str | None) -> str | None:
    """The same rules for one address in plain Python (for callers outside a frame, e.g. --from)."""
    if address is not None:
        try:
            address.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: polars holds only valid UTF-8
            return REASON_UNSAFE
    frame = pl.DataFrame({"e": [address]}, schema={"e": pl.String})
    reason = frame.select(invalid_reason(pl.col("e"))).to_series()[0]
    return None if reason is None else str(reason)
