"""The vectorised address validator: examples of each rule, and properties under hypothesis."""

from __future__ import annotations

import unicodedata

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import addresses
from pipeline.addresses import MAX_ADDRESS, MAX_LABEL, MAX_LOCAL, check_python

VALID = [
    "user@example.com",
    "first.last+tag@sub.example.co.uk",
    "o'brien@example.ie",
    "x@a-b.example",
    "zoë@bücher.de",                      # UTF-8 local part and IDN domain (RFC 6531)
    "用户@例子.测试",
    "δοκιμή@παράδειγμα.δοκιμή",
    "😀@example.com",                     # a symbol is atext under RFC 6531
    "a\u0301@example.com",                # a combining mark after a letter
    '"a b"@x.com',                         # quoted local part: spaces are allowed inside
    '"a@b"@example.com',                   # ... and so is an @
    '"a\\"b"@example.com',                 # ... and an escaped quote
    '"a\u00a0b"@example.com',              # ... and any Unicode space
    "user@xn--bcher-kva.example",          # an A-label
    "x" * 64 + "@example.com",             # local part at its limit
    "a@" + "d" * 63 + ".com",              # label at its limit
    "a@" + ".".join(["d" * 61] * 3) + ".com",  # 191-byte domain
]

INVALID = [
    ("", "empty address"),
    (None, "empty address"),
    ("no-at-sign.example.com", "no @ in address"),
    ("two@@example.com", "more than one @"),
    ("a@b@example.com", "more than one @"),
    ('a"@"@example.com', "more than one @"),
    ("sp ace@example.com", "whitespace"),
    ("a\u00a0b@example.com", "whitespace"),     # no-break space outside quotes
    ("a@exa mple.com", "whitespace"),
    ("new\nline@example.com", "CR or LF"),
    ("x@example.com\r\nBcc: victim@example.com", "CR or LF"),
    ("a\rb@example.com", "CR or LF"),
    ("tab\tin@example.com", "control"),
    ("nul\x00@example.com", "control"),
    ("zero\u200bwidth@example.com", "invisible"),
    ("bidi\u202e@example.com", "invisible"),
    ("line\u2028sep@example.com", "invisible"),
    ("next\x85line@example.com", "invisible"),
    ("private\ue000@example.com", "invisible"),
    ("a" * 65 + "@example.com", f"longer than {MAX_LOCAL}"),
    ("é" * 33 + "@example.com", f"longer than {MAX_LOCAL}"),  # 66 bytes, 33 characters
    ("a@" + ".".join(["d" * 60] * 5), f"longer than {MAX_ADDRESS}"),
    ("@example.com", "empty local part"),
    ("dot.@example.com", "dot-atom"),
    (".dot@example.com", "dot-atom"),
    ("two..dots@example.com", "dot-atom"),
    ("\u0301a@example.com", "dot-atom"),       # combining mark first
    ('""@example.com', "dot-atom"),
    ('"a"b"@example.com', "dot-atom"),
    ("a(comment)@example.com", "dot-atom"),
    ("user@", "empty domain"),
    ("x@nodot", "domain has no dot"),
    ("x@" + "d" * 64 + ".com", f"label longer than {MAX_LABEL}"),
    ("x@-bad.com", "host name"),
    ("x@bad-.com", "host name"),
    ("x@exa_mple.com", "host name"),
    ("x@[192.0.2.1]", "host name"),
    ("x@example.com.", "host name"),
    ("x@☃.com", "host name"),
    ("x@192.0.2.1", "all-digit"),
]


@pytest.mark.parametrize("address", VALID)
def test_valid_addresses_pass(address: str) -> None:
    assert check_python(address) is None


@pytest.mark.parametrize(("address", "reason"), INVALID)
def test_invalid_addresses_get_the_reason(address: str | None, reason: str) -> None:
    got = check_python(address)
    assert got is not None and reason in got, got


def test_lone_surrogate_is_refused_not_raised() -> None:
    assert check_python("\ud800@example.com") == addresses.REASON_UNSAFE


def test_split_counts_characters_not_bytes() -> None:
    # Regression: str.find gives a byte offset and str.slice counts characters, which put the
    # split in the wrong place for any non-ASCII local part.
    frame = pl.DataFrame({"e": ["zoë@bücher.de", "用户@例子.测试", '"a@b"@x.com', "none"]})
    local, domain = addresses.split_address(pl.col("e"))
    out = frame.select(local.alias("l"), domain.alias("d"))
    assert out["l"].to_list() == ["zoë", "用户", '"a@b"', None]
    assert out["d"].to_list() == ["bücher.de", "例子.测试", "x.com", None]


def test_normalise_lowers_the_domain_only() -> None:
    frame = pl.DataFrame({"e": ["User@EXAMPLE.Com", "zoë@BÜCHER.DE", '"A@B"@X.COM', "no-at"]})
    assert frame.select(addresses.normalise(pl.col("e")))["e"].to_list() == [
        "User@example.com", "zoë@bücher.de", '"A@B"@x.com', "no-at"]


def test_trim_strips_unicode_spaces_but_keeps_line_breaks() -> None:
    frame = pl.DataFrame({"e": ["  a@b.com\t", "\u00a0a@b.com\u3000", "a@b.com\r\n", None]})
    assert frame.select(addresses.trim(pl.col("e")))["e"].to_list() == [
        "a@b.com", "a@b.com", "a@b.com\r\n", None]


# --------------------------------------------------------------------------- properties

def _unquoted_ats(address: str) -> int:
    """'@' outside a leading quoted string, counted by a plain scanner (independent of regexes)."""
    rest = address
    if address.startswith('"'):
        i = 1
        while i < len(address) and address[i] != '"':
            i += 2 if address[i] == "\\" else 1
        rest = address[i + 1:]
    return rest.count("@")


def _unsafe(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "C" or ch in "\u2028\u2029"


# Characters that make addresses interesting, mixed with anything Unicode has (surrogates too).
_SPECIAL = st.sampled_from(list('@@@."\\ -_+\r\n\t\x00\x7f\x85\u00a0\u200b\u2028\u202eé例😀\u0301'))
_ANY = st.text(st.one_of(_SPECIAL, st.characters(exclude_categories=()),
                         st.sampled_from("abcxyz.com")), max_size=80)
# Near the length limits: local parts of 20-70 characters of 1-3 bytes, labels of 55-70.
_LONG = st.builds(
    lambda n, ch, labels: f"{ch * n}@{'.'.join(labels)}.com",
    st.integers(20, 70), st.sampled_from(["a", "é", "例"]),
    st.lists(st.integers(55, 70).map(lambda n: "d" * n), min_size=1, max_size=4))
# Quotes, escapes and '@' in the local part of an otherwise fine address.
_QUOTEISH = st.text(st.sampled_from(list('""@@a\\ .')), min_size=1, max_size=10).map(
    lambda s: f"{s}@example.com")


def _check(batch: list[str | None]) -> list[str | None]:
    """Run the vectorised validator over a batch, both ways (expression and annotate)."""
    safe = [None if s is None or not _encodable(s) else s for s in batch]
    frame = pl.DataFrame({"email": safe}, schema={"email": pl.String})
    direct = frame.select(addresses.invalid_reason(pl.col("email")).alias("r"))["r"].to_list()
    annotated = addresses.annotate(frame.lazy(), "email", reason="r", key="k").collect()
    assert annotated["r"].to_list() == direct  # splitting once gives the same verdicts
    return list(direct)


def _encodable(s: str) -> bool:
    try:
        s.encode()
    except UnicodeEncodeError:
        return False
    return True


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_ANY, _LONG, _QUOTEISH, st.none()), min_size=1, max_size=40))
def test_anything_accepted_is_safe_and_well_formed(batch: list[str | None]) -> None:
    for address, reason in zip(batch, _check(batch), strict=True):
        if reason is not None:
            assert isinstance(reason, str) and reason
            continue
        assert address is not None and _encodable(address)
        assert "\r" not in address and "\n" not in address
        assert not any(_unsafe(ch) for ch in address), address
        assert _unquoted_ats(address) == 1, address
        local, _, domain = address.rpartition("@")
        # The RFC 5321 numbers themselves, not the module's constants.
        assert len(address.encode()) <= 254
        assert 0 < len(local.encode()) <= 64
        assert 0 < len(domain.encode()) <= 253 and "." in domain
        assert all(0 < len(label) <= 63 for label in domain.split("."))
        if not local.startswith('"'):
            assert not any(ch.isspace() for ch in address), address


@settings(max_examples=60, deadline=None)
@given(st.text(st.characters(exclude_categories=())))
def test_no_input_makes_check_python_raise(address: str) -> None:
    reason = check_python(address)
    assert reason is None or isinstance(reason, str)


# Valid by construction: dot-atoms over RFC 5322 atext plus non-ASCII letters, quoted strings
# with spaces and '@', IDN labels.
_ATEXT = st.sampled_from(list("abcXYZ019!#$%&'*+/=?^_`{|}~-") + list("éßø例ñ😀"))
_ATOM = st.text(_ATEXT, min_size=1, max_size=8)
_DOT_ATOM = st.lists(_ATOM, min_size=1, max_size=4).map(".".join)
_QUOTED = st.lists(st.sampled_from(list("ab @.,;:()<>[]é") + ['\\"', "\\\\"]), min_size=1,
                   max_size=12).map(lambda parts: '"' + "".join(parts) + '"')
_LABEL = st.text(st.sampled_from(list("abz09ü例ж")), min_size=1, max_size=10)
_TLD = st.text(st.sampled_from(list("abzü例")), min_size=2, max_size=6)
_DOMAIN = st.builds(lambda labels, tld: ".".join([*labels, tld]),
                    st.lists(_LABEL, min_size=1, max_size=3), _TLD)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.builds(lambda lp, d: f"{lp}@{d}", st.one_of(_DOT_ATOM, _QUOTED), _DOMAIN),
                min_size=1, max_size=30))
def test_well_formed_addresses_pass(batch: list[str]) -> None:
    for address, reason in zip(batch, _check(list(batch)), strict=True):
        if len(address.rpartition("@")[0].encode()) <= MAX_LOCAL:
            assert reason is None, (address, reason)
