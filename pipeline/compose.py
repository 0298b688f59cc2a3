"""The composer: one recipient's `Message` in, the bytes that go on the wire out (`Envelope`).

Every header value is checked for CR/LF and other control characters (messages.HEADER_UNSAFE)
before it is used, so no field value can start a new header, whatever the loader let through.

The wire bytes are written here directly, not through the `email` package: everything that is
the same for every recipient (From, MIME-Version, Content-Type with its boundary, the parts'
headers) is built once per Composer, and a message only renders and encodes what varies (To,
Subject, Date once a second, Message-ID, List-Unsubscribe, the bodies). `email.mime` cost
130-300 µs a message here (plain; with an HTML part), this 16-24 µs one by one. Templates that
are only text and bare `{{ name }}`s are filled by joining strings (templates.Fill), the rest
rendered by Jinja2. For a Message read from a batch (messages.from_batch) the headers come
from its whole batch, prepared at its first call: compose_batch.py writes the header block of
the rows whose headers are plain by Arrow and renders the others' header templates; bodies
are always rendered and encoded per message (8.8 µs a message on average for the benchmark's
list, 11.2 before: `python scripts/bench_send_loop.py`, its "compose" stage).
tests/test_compose.py checks, with the `email` package's parser, that these messages read back
as intended, and as the `email` package's own ones do; tests/test_compose_batch.py that the
batch writes what this path writes.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Mapping
from email import message_from_bytes, message_from_string
from email import policy as email_policy
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Any, NamedTuple
from urllib.parse import quote

from jinja2 import Template
from jinja2.runtime import new_context

from . import compose_batch
from .config import MessageConfig
from .messages import Columns, Message, batch_row
from .mime import (
    BOUNDARY,
    ONE_CLICK,
    URL_UNSAFE,
    ComposeError,
    ascii_address,
    body,
    check_header,
    check_length,
    idna,
    mailbox,
    subject_line,
    text_headers,
)
from .templates import environment, fill, with_bodies

__all__ = ["ComposeError", "Composer", "Envelope"]


class Envelope(NamedTuple):  # a tuple: a frozen dataclass's __init__ cost ~1 µs a message
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
        self.envelope_from, self._from_utf8 = ascii_address(addr)
        check_header("From", message.from_addr)
        check_length("From address", self.envelope_from)
        self._from_line = (mailbox("From", display.strip(), self.envelope_from) + "\r\n").encode()
        self._head: tuple[int, bytes] = (-1, b"")  # From and Date, for the second it names
        # Each template's globals, flattened once (_render), and its Fill when it is only text
        # and names (templates.fill), by id(template).
        sources = ((self._subject, plain, self.config.subject),
                   (self._unsubscribe, plain, self.config.unsubscribe_url),
                   (self._text, plain, message.body), (self._html, html, message.html_body))
        self._globals = {id(t): dict(t.globals) for t, _, _ in sources if t is not None}
        self._fills = {id(t): fill(env, src) for t, env, src in sources
                       if t is not None and src is not None}
        self._plain = text_headers("plain")
        self._html_part = text_headers("html")
        if self._html is None:
            self._mime = b'MIME-Version: 1.0\r\n'
            self._delimiter = b""
        else:
            self._mime = (b'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; '
                          b'boundary="' + BOUNDARY.encode() + b'"\r\n\r\n')
            self._delimiter = b"--" + BOUNDARY.encode() + b"\r\n"
        self._close = b"\r\n--" + BOUNDARY.encode() + b"--\r\n"
        self._batch_lock = threading.Lock()
        self._plan = self._batch_plan()

    def _batch_plan(self) -> compose_batch.Plan | None:
        """What compose_batch needs, when the header templates are Fills and From is ASCII."""
        subject = self._fills[id(self._subject)]
        unsubscribe = None if self._unsubscribe is None else self._fills[id(self._unsubscribe)]
        if self._from_utf8 or subject is None or (self._unsubscribe and unsubscribe is None):
            return None
        return compose_batch.Plan(campaign=self.campaign, subject=subject, unsubscribe=unsubscribe,
                                  globals_=frozenset().union(*map(set, self._globals.values())))

    def builtins(self, msg: Message) -> dict[str, Any]:
        """The names every template has besides the row's fields."""
        return {"id": msg.id, "email": msg.to, "campaign": self.campaign}

    def context(self, msg: Message) -> dict[str, Any]:
        return {**self.builtins(msg), **msg.fields}

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

    def _parts(self, msg: Message, r: compose_batch.Rendered | None) -> _Parts:
        """The message's checked values; its templates rendered here unless `r` holds them."""
        builtins = self.builtins(msg)
        to_addr, to_utf8 = ascii_address(msg.to)
        check_length("To address", check_header("To", to_addr))
        raw_name = msg.fields.get("name")
        name = check_header("To display name", "" if raw_name is None else str(raw_name)).strip()
        subject = check_header("Subject", r.subject if r is not None else
                               self._render(self._subject, msg, builtins, "--subject"))
        url = None
        if self._unsubscribe is not None:
            url = check_header("List-Unsubscribe", (r.unsubscribe or "") if r is not None else
                               self._render(self._unsubscribe, msg, builtins,
                                            "--unsubscribe-url")).strip()
            if not url or URL_UNSAFE.search(url):
                raise ComposeError(f"--unsubscribe-url rendered to {url!r}, not a usable URL "
                                   "(escape values with |urlencode)")
            if not url.isascii():  # an IRI: its non-ASCII characters percent-encoded (RFC 3987)
                url = "".join(c if c.isascii() else quote(c) for c in url)
            check_length("List-Unsubscribe", url)
        utf8 = to_utf8 or self._from_utf8
        mid = check_length("Message-ID", check_header("Message-ID", msg.message_id))
        if not mid.isascii() and not utf8:  # the sender's IDN domain: its ASCII form
            left, _, right = mid.rpartition("@")
            mid = f"{left}@{idna(right.removesuffix('>'))}>" if right.endswith(">") else mid
        text, html = self._bodies(msg, builtins)
        return _Parts(name, to_addr, subject, mid, url, text, html, utf8)

    def _bodies(self, msg: Message, builtins: Mapping[str, Any]) -> tuple[str, str | None]:
        return ("" if self._text is None else self._render(self._text, msg, builtins, "--template"),
                None if self._html is None else
                self._render(self._html, msg, builtins, "--template (html)"))

    def _from_date(self) -> bytes:
        """The From and Date lines, which begin every message."""
        now = int(time.time())
        sec, value = self._head  # one tuple: safe to read while another thread replaces it
        if sec != now:
            date = format_datetime(dt.datetime.fromtimestamp(now, dt.UTC))
            value = self._from_line + b"Date: " + date.encode() + b"\r\n"
            self._head = (now, value)
        return value

    def _prepared(self, cols: Columns, i: int) -> compose_batch.Prepared | None:
        """Row `i` of its batch as compose_batch prepared it, the whole batch at its first row
        (None: the batch is composed one by one)."""
        done = cols.derived.get(self)
        if done is None:
            with self._batch_lock:
                done = cols.derived.get(self)
                if done is None:
                    try:
                        assert self._plan is not None
                        done = compose_batch.prepare(self._plan, cols) or ()
                    except Exception:  # noqa: BLE001 - a bug there: the one-by-one path is right
                        done = ()
                    cols.derived[self] = done
        return done[i] if done else None

    def envelope(self, msg: Message) -> Envelope:
        """The message as it goes on the wire (CRLF line ends, 7-bit unless SMTPUTF8).

        Raises ComposeError when this recipient's message cannot be built safely."""
        row = batch_row(msg.fields) if self._plan is not None else None
        got = None if row is None else self._prepared(*row)
        if isinstance(got, bytes):  # the header block, To to List-Unsubscribe
            text, html = self._bodies(msg, self.builtins(msg))
            return Envelope(self.envelope_from, msg.to, self._wire(got, text, html), False)
        p = self._parts(msg, got)
        return Envelope(self.envelope_from, p.to_addr, self._wire(p, p.text, p.html), p.utf8)

    def _wire(self, head: bytes | _Parts, text: str, html: str | None) -> bytes:
        """From and Date, the header block (prepared, or written from `head`), the bodies."""
        try:
            block = head if isinstance(head, bytes) else self._header_block(head)
            return self._from_date() + block + self._serialise_bodies(text, html)
        except (ValueError, TypeError, UnicodeError) as exc:  # e.g. a lone surrogate in a value
            raise ComposeError(f"message cannot be serialised: {exc}") from None

    def _header_block(self, p: _Parts) -> bytes:
        """To to List-Unsubscribe, the lines compose_batch writes for a plain row."""
        head = [mailbox("To", p.to_name, p.to_addr), "\r\n", subject_line(p.subject),
                "\r\nMessage-ID: ", p.message_id, "\r\n"]
        if p.unsubscribe is not None:
            head += ("List-Unsubscribe: <", p.unsubscribe, ">\r\n")
            # RFC 8058 one-click needs an HTTP(S) URI; a mailto: link alone cannot be POSTed to.
            if p.unsubscribe.lower().startswith(("https:", "http:")):
                head += (ONE_CLICK, "\r\n")
        # Only the addresses can be non-ASCII (SMTPUTF8); anything else is a bug caught here.
        return "".join(head).encode("utf-8" if p.utf8 else "ascii")

    def _serialise_bodies(self, text: str, html: str | None) -> bytes:
        """MIME-Version on: the parts' headers and bodies."""
        data, text_qp = body(text, single=html is None)
        if html is None:
            return b"".join((self._mime, self._plain[text_qp], data))
        html_data, html_qp = body(html, single=False)
        return b"".join((self._mime, self._delimiter, self._plain[text_qp], data, b"\r\n",
                         self._delimiter, self._html_part[html_qp], html_data, self._close))

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
