"""The composer: one recipient's `Message` in, the bytes that go on the wire out (`Envelope`).

Every header value is checked for CR/LF and other control characters (messages.HEADER_UNSAFE)
before it is used, so no field value can start a new header, whatever the loader let through.

The wire bytes are written here directly, not through the `email` package: everything that is
the same for every recipient (From, MIME-Version, Content-Type with its boundary, the parts'
headers) is built once per Composer, and a message only renders and encodes what varies (To,
Subject, Date once a second, Message-ID, List-Unsubscribe, the bodies). `email.mime` cost
130-300 µs a message here (plain; with an HTML part), this 16-24 µs (`python
scripts/bench_send_loop.py`, its "compose" stage). Templates that are only text and bare
`{{ name }}`s are filled by joining strings (templates.Fill), the rest rendered by Jinja2.
tests/test_compose.py checks, with the `email` package's parser, that these messages read back
as intended, and as the `email` package's own ones do.
"""

from __future__ import annotations

import binascii
import datetime as dt
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email import message_from_bytes, message_from_string
from email import policy as email_policy
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from functools import lru_cache
from typing import Any, NamedTuple
from urllib.parse import quote

from jinja2 import Template
from jinja2.runtime import new_context

from .config import MessageConfig
from .messages import HEADER_UNSAFE, Message
from .templates import environment, fill, with_bodies

# Also refused in a URL: an encoded-word lookalike, which a lenient reader (Python's) decodes.
_URL_UNSAFE = re.compile(r"[\s<>\"]|=\?[^?]+\?[bqBQ]\?[^?]*\?=")
# A display name that can go raw: RFC 5322 atoms separated by single spaces.
_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_PRINTABLE = re.compile(r"[\x20-\x7e]+")  # ...or as one quoted-string
_PIECES = re.compile(r"[ \t]*[^ \t]+")  # a header value split where it may be folded
# What keeps a body from going as 7bit: non-ASCII, controls (NUL among them) but tab and LF.
_NOT_7BIT = re.compile(r"[^\t\n\x20-\x7e]")
# Encoded-word text that is safe even in a display name (RFC 2047 5(3)); space becomes "_".
_Q_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
# "=_" never occurs in quoted-printable (a "=" there is "=XX" or a soft line break), so the
# boundary cannot appear in a QP part; a 7bit part that contains it goes as QP instead.
_BOUNDARY = "=_bulkmail_alt_1"
_MAX_LINE = 78  # folding target (RFC 5322 "SHOULD"); no line is ever over 998 octets
_MAX_EW_LINE = 76  # a line holding encoded words (RFC 2047 2)
_MAX_VALUE = 900  # an address, Message-ID or URL, which cannot be folded
_ONE_CLICK = "List-Unsubscribe-Post: List-Unsubscribe=One-Click"


class ComposeError(ValueError):
    """This recipient's message cannot be built safely (a permanent failure for that recipient)."""


def _idna(domain: str) -> str:
    try:
        domain.encode("ascii")
        return domain
    except UnicodeEncodeError:
        try:
            return domain.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ComposeError(f"domain {domain!r} cannot be IDNA-encoded ({exc})") from None


def _ascii_address(addr: str) -> tuple[str, bool]:
    """`addr` with an internationalised domain in its ASCII (IDNA) form, and whether the local
    part still needs SMTPUTF8."""
    local, _, domain = addr.rpartition("@")
    local_utf8 = not local.isascii()
    return f"{local}@{_idna(domain)}", local_utf8


def _check_header(name: str, value: str) -> str:
    if HEADER_UNSAFE.search(value):
        raise ComposeError(f"{name} would contain a line break or control character "
                           "(header injection refused)")
    return value


def _check_length(name: str, value: str) -> str:
    if len(value) > _MAX_VALUE:
        raise ComposeError(f"{name} is {len(value)} characters long, over {_MAX_VALUE}")
    return value


def _q(c: str) -> str:
    """One character in the Q encoding, remembered for the next time (a few thousand at most)."""
    piece = c if c in _Q_SAFE else "_" if c == " " else "".join(f"={b:02X}" for b in c.encode())
    if len(_Q) < 4096:
        _Q[c] = piece
    return piece


_Q: dict[str, str] = {}


def _encoded_words(text: str, first: int) -> list[str]:
    """`text` (not empty) as RFC 2047 encoded words, UTF-8: Q (readable) unless B is a quarter
    shorter (most non-Latin text). Whole characters in each word, no word over 75 characters
    and the first no longer than `first`. A reader drops the folding white space between
    adjacent words (RFC 2047 6.2)."""
    room = first - 12  # 12: "=?utf-8?q?" and "?="
    pieces = [_Q.get(c) or _q(c) for c in text]
    q_size, data = sum(map(len, pieces)), text.encode()
    if q_size * 3 <= -(-len(data) // 3) * 16:
        if q_size <= room:
            return ["=?utf-8?q?" + "".join(pieces) + "?="]
        words: list[str] = []
        current: list[str] = []
        size = 0
        for piece in pieces:
            if size + len(piece) > room and current:
                words.append("=?utf-8?q?" + "".join(current) + "?=")
                current, size, room = [], 0, 63
            current.append(piece)
            size += len(piece)
        words.append("=?utf-8?q?" + "".join(current) + "?=")
        return words
    limit = room // 4 * 3
    if len(data) <= limit:
        return [_b_word(text)]
    words, start, size = [], 0, 0
    for i, c in enumerate(text):
        n = 1 if c < "\x80" else 2 if c < "\u0800" else 3 if c < "\U00010000" else 4
        if size + n > limit and size:
            words.append(_b_word(text[start:i]))
            start, size, limit = i, 0, 45
        size += n
    words.append(_b_word(text[start:]))
    return words


def _b_word(text: str) -> str:
    return "=?utf-8?b?" + binascii.b2a_base64(text.encode(), newline=False).decode("ascii") + "?="


def _fold(head: str, value: str) -> str | None:
    """`head` + `value` folded at white space into lines of at most 78 characters where the
    value allows; None when some line would still be over 998 (too long a word)."""
    if len(head) + len(value) <= _MAX_LINE:
        return head + value
    lines, line = [], head
    for piece in _PIECES.findall(value):
        if len(line) + len(piece) > _MAX_LINE and line != head:
            lines.append(line)
            line = piece  # starts with the white space it was folded at
        else:
            line += piece
    lines.append(line)
    return None if max(map(len, lines)) > 998 else "\r\n".join(lines)


@lru_cache(maxsize=256)  # a subject without per-recipient fields is encoded once
def _subject(subject: str) -> str:
    """The Subject header: raw when it is ASCII and reads back as itself, else encoded words."""
    if not subject:
        return "Subject:"
    if (subject.isascii() and "=?" not in subject and subject[0] not in " \t"
            and subject[-1] not in " \t"):  # a reader drops leading white space
        folded = _fold("Subject: ", subject)
        if folded is not None:
            return folded
    return "Subject: " + "\r\n ".join(_encoded_words(subject, _MAX_EW_LINE - 9))


def _mailbox(field: str, name: str, addr: str) -> str:
    """`field: name <addr>` (or the bare address when there is no name), folded. `name` is
    stripped and checked; it goes raw as atoms, else as a quoted-string, else (non-ASCII,
    tabs, "=?" that a reader would decode) as encoded words."""
    head = field + ": "
    if not name:
        return head + addr
    text, limit = None, _MAX_LINE
    if "=?" not in name and _PRINTABLE.fullmatch(name):
        phrase = name if _ATOMS.fullmatch(name) else (
            '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"')
        text = _fold(head, phrase)
    if text is None:
        limit = _MAX_EW_LINE
        text = head + "\r\n ".join(_encoded_words(name, limit - len(head)))
    last = len(text) - text.rfind("\n") - 1
    return text + ("\r\n <" if last + len(addr) + 3 > limit else " <") + addr + ">"


def _body(text: str, *, single: bool) -> tuple[bytes, bool]:
    """A body with CRLF line ends and whether it is quoted-printable (else 7bit). Any CR, LF or
    CRLF in `text` is a line break. 7bit when that is safe: ASCII, no control but tab, lines of at
    most 998 octets, no line starting "From " (mbox mangling), not holding the boundary, and for
    a single part, ending with a line break (the message ends with CRLF)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if (not _NOT_7BIT.search(text) and (not single or not text or text[-1] == "\n")
            and not text.startswith("From ") and "\nFrom " not in text and _BOUNDARY not in text
            and (len(text) <= 998 or max(map(len, text.split("\n"))) <= 998)):
        return text.replace("\n", "\r\n").encode("ascii"), False
    qp = binascii.b2a_qp(text.encode(), istext=True)  # LF line ends: no CR left in text
    if qp.startswith(b"From "):
        qp = b"=46" + qp[1:]
    qp = qp.replace(b"\nFrom ", b"\n=46rom ").replace(b"\n", b"\r\n")
    if single and not qp.endswith(b"\n"):
        qp += b"=\r\n"  # a soft line break: the text ends without one, the message with CRLF
    return qp, True


def _text_headers(subtype: str) -> tuple[bytes, bytes]:
    """A text part's Content-Type and Content-Transfer-Encoding lines, 7bit and QP, with the
    blank line that ends them."""
    ctype = f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: '
    return (ctype + "7bit\r\n\r\n").encode(), (ctype + "quoted-printable\r\n\r\n").encode()


@dataclass(frozen=True, slots=True)
class Envelope:
    """What goes on the wire for one message: SMTP envelope plus the serialised message."""

    sender: str
    recipient: str
    data: bytes
    smtputf8: bool  # the envelope needs the server's SMTPUTF8 extension


class _Parts(NamedTuple):  # a tuple: a frozen dataclass's __init__ cost ~1 µs a message
    """One recipient's rendered, checked header values and bodies."""

    to_name: str
    to_addr: str
    subject: str
    message_id: str
    unsubscribe: str | None
    text: str
    html: str | None
    utf8: bool


class Composer:
    """Turns a `Message` into its email. Thread-safe; build one per process: it reads and
    compiles the templates and builds the constant headers once.

    Messages are 7-bit (quoted-printable for non-ASCII bodies, RFC 2047 encoded words for
    non-ASCII names and subjects), so none depends on the server offering 8BITMIME. A
    recipient (or sender) whose local part is not ASCII gets its address raw in UTF-8 and an
    envelope that needs SMTPUTF8; everything else in that message stays 7-bit.
    """

    def __init__(self, message: MessageConfig, *, campaign: str) -> None:
        self.config = message
        self.campaign = campaign
        plain, html = environment(False), environment(True)
        self._subject: Template = plain.from_string(message.subject)
        self._unsubscribe: Template | None = (
            plain.from_string(message.unsubscribe_url) if message.unsubscribe_url else None)
        message = with_bodies(message)
        self._text: Template | None = (
            plain.from_string(message.body) if message.body is not None else None)
        self._html: Template | None = (
            html.from_string(message.html_body) if message.html_body is not None else None)
        display, addr = parseaddr(message.from_addr)
        self.envelope_from, self._from_utf8 = _ascii_address(addr)
        _check_header("From", message.from_addr)
        _check_length("From address", self.envelope_from)
        self._from_line = (_mailbox("From", display.strip(), self.envelope_from) + "\r\n").encode()
        self._date: tuple[int, str] = (-1, "")
        # Each template's globals, flattened once (_render), and its Fill when it is only text
        # and names (templates.fill), by id(template).
        sources = ((self._subject, plain, self.config.subject),
                   (self._unsubscribe, plain, self.config.unsubscribe_url),
                   (self._text, plain, message.body), (self._html, html, message.html_body))
        self._globals = {id(t): dict(t.globals) for t, _, _ in sources if t is not None}
        self._fills = {id(t): fill(env, src) for t, env, src in sources
                       if t is not None and src is not None}
        self._plain = _text_headers("plain")
        self._html_part = _text_headers("html")
        if self._html is None:
            self._mime = b'MIME-Version: 1.0\r\n'
            self._delimiter = b""
        else:
            self._mime = (b'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; '
                          b'boundary="' + _BOUNDARY.encode() + b'"\r\n\r\n')
            self._delimiter = b"--" + _BOUNDARY.encode() + b"\r\n"
        self._close = b"\r\n--" + _BOUNDARY.encode() + b"--\r\n"

    def context(self, msg: Message) -> dict[str, Any]:
        return {"id": msg.id, "email": msg.to, "campaign": self.campaign, **msg.fields}

    def _render(self, template: Template, msg: Message, builtins: Mapping[str, Any],
                what: str) -> str:
        f = self._fills[id(template)]
        if f is not None:
            try:
                out = f(msg.fields, builtins, self._globals[id(template)])
            except Exception as exc:  # noqa: BLE001 - a value whose str() raises
                raise ComposeError(f"{what} template failed: {type(exc).__name__}: {exc}") from None
            if out is not None:
                return out
        return self._jinja(template, self.context(msg), what)

    def _jinja(self, template: Template, ctx: Mapping[str, Any], what: str) -> str:
        # What `template.render(ctx)` does, less its per-call copy of the template's globals (a
        # ChainMap walked in Python, twice): they are flattened once per template here, and the
        # recipient's values override them as in render. 12.7 -> 6.4 us per render, and Jinja2's
        # context building was a fifth of the async send loop's time in a py-spy profile.
        try:
            context = new_context(template.environment, template.name, template.blocks,
                                  {**self._globals[id(template)], **ctx}, shared=True)
            return "".join(template.root_render_func(context))
        except Exception as exc:  # noqa: BLE001 - SecurityError, TypeError, ... from a template
            raise ComposeError(f"{what} template failed: {type(exc).__name__}: {exc}") from None

    def _parts(self, msg: Message) -> _Parts:
        builtins = {"id": msg.id, "email": msg.to, "campaign": self.campaign}
        to_addr, to_utf8 = _ascii_address(msg.to)
        _check_length("To address", _check_header("To", to_addr))
        raw_name = msg.fields.get("name")
        name = _check_header("To display name", "" if raw_name is None else str(raw_name)).strip()
        subject = _check_header("Subject", self._render(self._subject, msg, builtins, "--subject"))
        url = None
        if self._unsubscribe is not None:
            url = _check_header("List-Unsubscribe",
                                self._render(self._unsubscribe, msg, builtins,
                                             "--unsubscribe-url")).strip()
            if not url or _URL_UNSAFE.search(url):
                raise ComposeError(f"--unsubscribe-url rendered to {url!r}, not a usable URL "
                                   "(escape values with |urlencode)")
            if not url.isascii():  # an IRI: its non-ASCII characters percent-encoded (RFC 3987)
                url = "".join(c if c.isascii() else quote(c) for c in url)
            _check_length("List-Unsubscribe", url)
        utf8 = to_utf8 or self._from_utf8
        mid = _check_length("Message-ID", _check_header("Message-ID", msg.message_id))
        if not mid.isascii() and not utf8:  # the sender's IDN domain: its ASCII form
            left, _, right = mid.rpartition("@")
            mid = f"{left}@{_idna(right.removesuffix('>'))}>" if right.endswith(">") else mid
        text = self._render(self._text, msg, builtins, "--template") if self._text is not None else ""
        html = (self._render(self._html, msg, builtins, "--template (html)")
                if self._html is not None else None)
        return _Parts(name, to_addr, subject, mid, url, text, html, utf8)

    def _date_value(self) -> str:
        now = int(time.time())
        sec, value = self._date  # one tuple: safe to read while another thread replaces it
        if sec != now:
            value = format_datetime(dt.datetime.fromtimestamp(now, dt.UTC))
            self._date = (now, value)
        return value

    def envelope(self, msg: Message) -> Envelope:
        """The message as it goes on the wire (CRLF line ends, 7-bit unless SMTPUTF8).

        Raises ComposeError when this recipient's message cannot be built safely."""
        p = self._parts(msg)
        try:
            data = self._serialise(p)
        except (ValueError, TypeError, UnicodeError) as exc:  # e.g. a lone surrogate in a value
            raise ComposeError(f"message cannot be serialised: {exc}") from None
        return Envelope(self.envelope_from, p.to_addr, data, p.utf8)

    def _serialise(self, p: _Parts) -> bytes:
        head = [_mailbox("To", p.to_name, p.to_addr), "\r\n", _subject(p.subject),
                "\r\nDate: ", self._date_value(), "\r\nMessage-ID: ", p.message_id, "\r\n"]
        if p.unsubscribe is not None:
            head += ("List-Unsubscribe: <", p.unsubscribe, ">\r\n")
            # RFC 8058 one-click needs an HTTP(S) URI; a mailto: link alone cannot be POSTed to.
            if p.unsubscribe.lower().startswith(("https:", "http:")):
                head += (_ONE_CLICK, "\r\n")
        # Only the addresses can be non-ASCII (SMTPUTF8); anything else is a bug caught here.
        header = self._from_line + "".join(head).encode("utf-8" if p.utf8 else "ascii")
        text, text_qp = _body(p.text, single=p.html is None)
        if p.html is None:
            return b"".join((header, self._mime, self._plain[text_qp], text))
        html, html_qp = _body(p.html, single=False)
        return b"".join((header, self._mime, self._delimiter, self._plain[text_qp], text,
                         b"\r\n", self._delimiter, self._html_part[html_qp], html, self._close))

    def compose(self, msg: Message) -> EmailMessage:
        """The message as an `EmailMessage`, parsed back from its wire bytes (what a receiver
        reads). Raises ComposeError like `envelope`."""
        env = self.envelope(msg)
        # Wire line ends (CRLF) become local ones, as a mail client stores a received message;
        # an SMTPUTF8 message's headers are UTF-8 text.
        data = env.data.replace(b"\r\n", b"\n")
        parsed = (message_from_string(data.decode("utf-8"), policy=email_policy.default)
                  if env.smtputf8 else message_from_bytes(data, policy=email_policy.default))
        assert isinstance(parsed, EmailMessage)
        return parsed
