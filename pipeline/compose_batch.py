"""The composer's common case for a whole batch at once, by Arrow: every row whose headers are
plain (ASCII values that go raw and unfolded, subject and unsubscribe templates of text and
names) gets its header block (To to List-Unsubscribe) here; any other row gets its subject and
URL rendered here and the rest of its headers written one by one. Bodies are always rendered
and encoded per message (compose.py): Arrow's string kernels cost about 7 ns a byte here,
several times Python's own `replace` or `join` on bytes, so over a body of a few KB the batch
lost, and holding a whole batch of bodies would cost its size in memory.

The header block costs about 2 µs a row for the batch against 5-6 one by one. The bytes are
exactly the one-by-one path's (tests/test_compose_batch.py checks them row by row over
arbitrary values): each rule below is the one-by-one rule (mime.py) restricted to the values
where it takes its simplest branch, and a row that meets any other branch is not prepared here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from .messages import Columns
from .mime import ATOMS, MAX_LINE, MAX_VALUE, ONE_CLICK, URL_UNSAFE
from .templates import Fill

_STR = pa.large_string()
# What HEADER_UNSAFE refuses, as far as ASCII goes (its other ranges are not ASCII).
_CONTROL = r"[\x00-\x08\x0a-\x1f\x7f]"
# A display name that goes raw (mime.ATOMS) or as one quoted-string (mime.PRINTABLE), neither
# with white space at its ends (the composer strips it: such names go one by one).
_ATOMS = f"^(?:{ATOMS.pattern})$"
_QUOTABLE = r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$"


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """What the composer gives the batch path: its header templates as `Fill`s."""

    campaign: str
    globals_: frozenset[str]  # names the templates' globals answer (left to Jinja2)
    subject: Fill
    unsubscribe: Fill | None


def _s(text: str) -> pa.Scalar:
    return pa.scalar(text, _STR)


class _Rows:
    """One batch's values and the mask of the rows still plain (`ok`)."""

    def __init__(self, plan: Plan, cols: Columns) -> None:
        self.plan, self.cols = plan, cols
        self.n = cols.table.num_rows
        self.ok: Any = pa.array([True] * self.n)
        self._values: dict[str, Any] = {}
        self._headers: list[Any] = []

    def column(self, name: str) -> Any:
        return self.cols.table.column(name).combine_chunks()

    def keep(self, mask: Any) -> None:
        self.ok = pc.and_(self.ok, mask)

    def value(self, name: str) -> Any:
        """What `{{ name }}` prints in each row (templates.Fill's lookup): the row's field,
        else a builtin, else nothing."""
        out = self._values.get(name)
        if out is not None:
            return out
        if name in self.cols.names:
            out = _as_text(self.column(name))
        elif name in ("id", "email"):
            out = pc.cast(self.column(name), _STR)
        elif name == "campaign":
            out = _s(self.plan.campaign)
        else:
            out = _s("")
        self._values[name] = out
        return out

    def render(self, fill: Fill) -> Any:
        args: list[Any] = []
        for text, name in zip(fill.texts, fill.names, strict=False):  # one text more
            args += (_s(text), self.value(name))
        out = pc.binary_join_element_wise(*args, _s(fill.texts[-1]), _s(""))
        return pa.array([out.as_py()] * self.n, _STR) if isinstance(out, pa.Scalar) else out

    def header_value(self, values: Any) -> Any:
        """Keeps the rows where `values` is within 900 characters, and (`check_headers`)
        ASCII and free of controls."""
        self.keep(pc.less_equal(pc.binary_length(values), MAX_VALUE))
        self._headers.append(values)
        return values

    def check_headers(self) -> None:
        # One pass over all of a row's header values: each regex call costs ~0.1 ms a batch.
        every = pc.binary_join_element_wise(*self._headers, _s(" "))
        self.keep(pc.and_(pc.string_is_ascii(every),
                          pc.invert(pc.match_substring_regex(every, _CONTROL))))


def _as_text(column: Any) -> Any:
    """A column as Fill prints its values (`str`, a null as nothing)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        values = pc.cast(column, _STR)
    else:
        values = pa.array(["" if v is None else str(v) for v in column.to_pylist()], _STR)
    return pc.fill_null(values, "")


class Rendered(NamedTuple):
    """A row that is not plain: its rendered header templates, for the one-by-one path."""

    subject: str
    unsubscribe: str | None


# A plain row's header lines after Date (To to List-Unsubscribe), or the row's rendered templates.
Prepared = bytes | Rendered


def prepare(plan: Plan, cols: Columns) -> list[Prepared] | None:
    """Each row prepared, or None when a template names a global (Jinja2 renders those)."""
    fills = [f for f in (plan.subject, plan.unsubscribe) if f is not None]
    if any(n in plan.globals_ and n not in cols.names for f in fills for n in f.names):
        return None
    rows = _Rows(plan, cols)
    # To: the address as it is (ASCII, so its IDNA form is itself), the name raw or quoted.
    addr = rows.header_value(pc.cast(rows.column("email"), _STR))
    rows.keep(pc.match_substring(addr, "@"))
    name = rows.header_value(rows.value("name") if "name" in cols.names
                             else pa.array([""] * rows.n, _STR))
    atoms = pc.match_substring_regex(name, _ATOMS)
    rows.keep(pc.and_(pc.invert(pc.match_substring(name, "=?")),
                      pc.or_(pc.or_(atoms, pc.equal(pc.binary_length(name), 0)),
                             pc.match_substring_regex(name, _QUOTABLE))))
    quoted = pc.binary_join_element_wise(
        _s('"'), pc.replace_substring(pc.replace_substring(name, "\\", "\\\\"), '"', '\\"'),
        _s('"'), _s(""))
    phrase = pc.if_else(atoms, name, quoted)
    width = pc.add(pc.binary_length(phrase), 4)  # "To: "
    rows.keep(pc.less_equal(width, MAX_LINE))
    gap = pc.if_else(pc.greater(pc.add(pc.add(width, pc.binary_length(addr)), 3), MAX_LINE),
                     _s("\r\n <"), _s(" <"))
    named = pc.binary_join_element_wise(_s("To: "), phrase, gap, addr, _s(">"), _s(""))
    to = pc.if_else(pc.equal(pc.binary_length(name), 0),
                    pc.binary_join_element_wise(_s("To: "), addr, _s("")), named)
    # Subject: raw and on one line, or empty.
    subject = rows.header_value(rows.render(plan.subject))
    size = pc.binary_length(subject)
    edge = pc.or_(pc.or_(pc.starts_with(subject, " "), pc.starts_with(subject, "\t")),
                  pc.or_(pc.ends_with(subject, " "), pc.ends_with(subject, "\t")))
    rows.keep(pc.and_(pc.invert(pc.match_substring(subject, "=?")),
                      pc.or_(pc.equal(size, 0),
                             pc.and_(pc.less_equal(pc.add(size, 9), MAX_LINE),
                                     pc.invert(edge)))))
    subject_line = pc.if_else(pc.equal(size, 0), _s("Subject:"),
                              pc.binary_join_element_wise(_s("Subject: "), subject, _s("")))
    mids = cols.message_ids
    mid = rows.header_value(pc.cast(mids.combine_chunks() if isinstance(mids, pa.ChunkedArray)
                                    else mids, _STR))
    pieces = [to, _s("\r\n"), subject_line, _s("\r\nMessage-ID: "), mid, _s("\r\n")]
    url = None
    if plan.unsubscribe is not None:
        url = rows.header_value(rows.render(plan.unsubscribe))
        rows.keep(pc.and_(pc.greater(pc.binary_length(url), 0),
                          pc.invert(pc.match_substring_regex(url, URL_UNSAFE.pattern))))
        web = pc.or_(pc.starts_with(url, "https:", ignore_case=True),
                     pc.starts_with(url, "http:", ignore_case=True))
        pieces += (_s("List-Unsubscribe: <"), url, _s(">\r\n"),
                   pc.if_else(web, _s(ONE_CLICK + "\r\n"), _s("")))
    rows.check_headers()
    joined = pc.cast(pc.binary_join_element_wise(*pieces, _s("")), pa.large_binary())
    out: list[Any] = pc.if_else(rows.ok, joined, pa.scalar(None, pa.large_binary())).to_pylist()
    if None in out:
        subjects = subject.to_pylist()
        urls = [None] * rows.n if url is None else url.to_pylist()
        for i, head in enumerate(out):
            if head is None:
                out[i] = Rendered(subjects[i], urls[i])
    return out
