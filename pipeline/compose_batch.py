"""The composer's common case for a whole batch at once, by Arrow: every row whose message is
plain (ASCII header values that go raw and unfolded, 7-bit bodies, templates that are only text
and names) gets its wire bytes here; any other row is left to the composer's one-by-one path.

Per message this costs about 2 µs against the one-by-one path's 11 (`python
scripts/bench_send_loop.py`, "compose"), where composing had become 40% of an async SMTP
actor's send loop. The bytes are exactly the one-by-one path's (tests/test_compose_batch.py
checks them row by row over arbitrary values): each rule below is the one-by-one rule
(compose.py) restricted to the values where it takes its simplest branch, and a row that
meets any other branch is not prepared here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from .messages import Columns
from .mime import ATOMS, BOUNDARY, MAX_LINE, MAX_VALUE, ONE_CLICK, URL_UNSAFE
from .templates import Fill

_STR = pa.large_string()
# What HEADER_UNSAFE refuses, as far as ASCII goes (its other ranges are not ASCII).
_CONTROL = r"[\x00-\x08\x0a-\x1f\x7f]"
# A display name that goes raw (mime.ATOMS) or as one quoted-string (mime.PRINTABLE), neither
# with white space at its ends (the composer strips it: such names go one by one).
_ATOMS = f"^(?:{ATOMS.pattern})$"
_QUOTABLE = r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$"
# What keeps a body from going as 7bit (mime.body): a control but tab and LF (CR among them),
# non-ASCII, a line starting "From ", the multipart boundary.
_NOT_7BIT = r"[^\t\n\x20-\x7e]|^From |\nFrom |" + BOUNDARY


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """What the composer gives the batch path: its templates as `Fill`s (None: no such part)
    and the constant pieces of the message after its Date line."""

    campaign: str
    globals_: frozenset[str]  # names the templates' globals answer (left to Jinja2)
    subject: Fill
    unsubscribe: Fill | None
    text: Fill | None
    html: Fill | None
    mime: str  # MIME-Version, and for two parts the multipart Content-Type and blank line
    plain_part: str  # the text part's headers, 7bit, and the blank line
    html_part: str
    delimiter: str
    close: str


def _s(text: str) -> pa.Scalar:
    return pa.scalar(text, _STR)


class _Rows:
    """One batch's values and the mask of the rows still plain (`ok`)."""

    def __init__(self, plan: Plan, cols: Columns) -> None:
        self.plan, self.cols = plan, cols
        self.n = cols.table.num_rows
        self.ok: Any = pa.array([True] * self.n)
        self._values: dict[tuple[str, bool], Any] = {}
        self._headers: list[Any] = []

    def column(self, name: str) -> Any:
        return self.cols.table.column(name).combine_chunks()

    def keep(self, mask: Any) -> None:
        self.ok = pc.and_(self.ok, mask)

    def value(self, name: str, escaped: bool) -> Any:
        """What `{{ name }}` prints in each row (templates.Fill's lookup): the row's field,
        else a builtin, else nothing; HTML-escaped as markupsafe does when `escaped`."""
        key = (name, escaped)
        out = self._values.get(key)
        if out is not None:
            return out
        if name in self.cols.names:
            out = _as_text(self.column(name))
        elif name == "id":
            out = pc.cast(self.column("id"), _STR)
        elif name == "email":
            out = pc.cast(self.column("email"), _STR)
        elif name == "campaign":
            out = _s(self.plan.campaign)
        else:
            out = _s("")
        if escaped:
            for raw, html in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("'", "&#39;"),
                              ('"', "&#34;")):
                out = pc.replace_substring(out, raw, html)
        self._values[key] = out
        return out

    def render(self, fill: Fill, escaped: bool) -> Any:
        args: list[Any] = []
        for text, name in zip(fill.texts, fill.names, strict=False):  # one text more
            args += (_s(text), self.value(name, escaped))
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

    def body(self, text: Any, *, single: bool) -> Any:
        """A 7-bit body with CRLF line ends (compose._body's 7bit branch); other rows go."""
        self.keep(pc.invert(pc.match_substring_regex(text, _NOT_7BIT)))
        if single:
            self.keep(pc.or_(pc.ends_with(text, "\n"), pc.equal(pc.binary_length(text), 0)))
        if (pc.max(pc.binary_length(text)).as_py() or 0) > 998:
            lines = pc.split_pattern(text, "\n")
            long = pc.greater(pc.binary_length(pc.list_flatten(lines)), 998)
            rows = pc.filter(pc.list_parent_indices(lines), long).to_pylist()
            if rows:
                bad = [False] * self.n
                for i in rows:
                    bad[i] = True
                self.keep(pc.invert(pa.array(bad)))
        return pc.replace_substring(text, "\n", "\r\n")


def _as_text(column: Any) -> Any:
    """A column as Fill prints its values (`str`, a null as nothing)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        values = pc.cast(column, _STR)
    else:
        values = pa.array(["" if v is None else str(v) for v in column.to_pylist()], _STR)
    return pc.fill_null(values, "")


class Rendered(NamedTuple):
    """A row that is not plain: its rendered templates, for the one-by-one path to encode."""

    subject: str
    unsubscribe: str | None
    text: str | None
    html: str | None


# A plain row's message after its Date line, as it is and as the DATA payload (dot-stuffed and
# ended: stuffing 1,000 messages here costs what one costs in wire.dot_stuffed); or the row's
# rendered templates.
Prepared = tuple[bytes, bytes] | Rendered


def prepare(plan: Plan, cols: Columns) -> list[Prepared] | None:
    """Each row prepared, or None when a template names a global (Jinja2 renders those)."""
    fills = [f for f in (plan.subject, plan.unsubscribe, plan.text, plan.html) if f is not None]
    if any(n in plan.globals_ and n not in cols.names for f in fills for n in f.names):
        return None
    rows = _Rows(plan, cols)
    # To: the address as it is (ASCII, so its IDNA form is itself), the name raw or quoted.
    addr = rows.header_value(pc.cast(rows.column("email"), _STR))
    rows.keep(pc.match_substring(addr, "@"))
    name = rows.header_value(rows.value("name", False) if "name" in cols.names
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
    subject = rows.header_value(rows.render(plan.subject, False))
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
    url = text = html = None
    if plan.unsubscribe is not None:
        url = rows.header_value(rows.render(plan.unsubscribe, False))
        rows.keep(pc.and_(pc.greater(pc.binary_length(url), 0),
                          pc.invert(pc.match_substring_regex(url, URL_UNSAFE.pattern))))
        web = pc.or_(pc.starts_with(url, "https:", ignore_case=True),
                     pc.starts_with(url, "http:", ignore_case=True))
        pieces += (_s("List-Unsubscribe: <"), url, _s(">\r\n"),
                   pc.if_else(web, _s(ONE_CLICK + "\r\n"), _s("")))
    rows.check_headers()
    pieces += (_s(plan.mime), _s(plan.delimiter), _s(plan.plain_part))
    if plan.text is not None:
        text = rows.render(plan.text, False)
        pieces.append(rows.body(text, single=plan.html is None))
    if plan.html is not None:
        html = rows.render(plan.html, True)
        pieces += (_s("\r\n"), _s(plan.delimiter), _s(plan.html_part),
                   rows.body(html, single=False), _s(plan.close))
    joined = pc.cast(pc.binary_join_element_wise(*pieces, _s("")), pa.large_binary())
    # No line of the head starts with a dot, and every message ends with CRLF.
    stuffed = pc.binary_join_element_wise(pc.replace_substring(joined, b"\r\n.", b"\r\n.."),
                                          pa.scalar(b".\r\n", pa.large_binary()),
                                          pa.scalar(b"", pa.large_binary()))
    out: list[Any] = [(a, b) if a is not None else None for a, b in zip(
        pc.if_else(rows.ok, joined, pa.scalar(None, pa.large_binary())).to_pylist(),
        stuffed.to_pylist(), strict=True)]
    if None in out:
        subjects = subject.to_pylist()
        urls, texts, htmls = ([None] * rows.n if v is None else v.to_pylist()
                              for v in (url, text, html))
        for i, wire in enumerate(out):
            if wire is None:
                out[i] = Rendered(subjects[i], urls[i], texts[i], htmls[i])
    return out
