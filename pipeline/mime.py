"""The message format's rules, one value at a time: addresses (IDNA, SMTPUTF8), header
safety and lengths, RFC 2047 encoded words, folding, display names, Subject, and bodies as 7bit
or quoted-printable with CRLF line ends. The composer (compose.py) assembles messages from
them; compose_batch.py applies the simplest branch of the same rules to a whole batch.
"""

from __future__ import annotations

import binascii
import re
from functools import lru_cache

from .messages import HEADER_UNSAFE

# Also refused in a URL: an encoded-word lookalike, which a lenient reader (Python's) decodes.
URL_UNSAFE = re.compile(r"[\s<>\"]|=\?[^?]+\?[bqBQ]\?[^?]*\?=")
# A display name that can go raw: RFC 5322 atoms separated by single spaces.
ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
PRINTABLE = re.compile(r"[\x20-\x7e]+")  # ...or as one quoted-string
_PIECES = re.compile(r"[ \t]*[^ \t]+")  # a header value split where it may be folded
# Encoded-word text that is safe even in a display name (RFC 2047 5(3)); space becomes "_".
_Q_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
# "=_" never occurs in quoted-printable (a "=" there is "=XX" or a soft line break), so the
# boundary cannot appear in a QP part; a 7bit part that contains it goes as QP instead.
BOUNDARY = "=_bulkmail_alt_1"
MAX_LINE = 78  # folding target (RFC 5322 "SHOULD"); no line is ever over 998 octets
MAX_EW_LINE = 76  # a line holding encoded words (RFC 2047 2)
MAX_VALUE = 900  # an address, Message-ID or URL, which cannot be folded
ONE_CLICK = "List-Unsubscribe-Post: List-Unsubscribe=One-Click"


class ComposeError(ValueError):
    """This recipient's message cannot be built safely (a permanent failure for that recipient)."""


def idna(domain: str) -> str:
    try:
        domain.encode("ascii")
        return domain
    except UnicodeEncodeError:
        try:
            return domain.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ComposeError(f"domain {domain!r} cannot be IDNA-encoded ({exc})") from None


def ascii_address(addr: str) -> tuple[str, bool]:
    """`addr` with an internationalised domain in its ASCII (IDNA) form, and whether the local
    part still needs SMTPUTF8."""
    local, _, domain = addr.rpartition("@")
    local_utf8 = not local.isascii()
    return f"{local}@{idna(domain)}", local_utf8


def check_header(name: str, value: str) -> str:
    if HEADER_UNSAFE.search(value):
        raise ComposeError(f"{name} would contain a line break or control character "
                           "(header injection refused)")
    return value


def check_length(name: str, value: str) -> str:
    if len(value) > MAX_VALUE:
        raise ComposeError(f"{name} is {len(value)} characters long, over {MAX_VALUE}")
    return value


class _QTable(dict[int, str]):
    """A code point's piece in the Q encoding (for `str.translate`), remembered for the next
    time: a few thousand characters at most."""

    def __missing__(self, code: int) -> str:
        c = chr(code)
        piece = c if c in _Q_SAFE else "_" if c == " " else "".join(f"={b:02X}" for b in c.encode())
        if len(self) < 4096:
            self[code] = piece
        return piece


_Q = _QTable()


def encoded_words(text: str, first: int) -> list[str]:
    """`text` (not empty) as RFC 2047 encoded words, UTF-8: Q (readable) unless B is a quarter
    shorter (most non-Latin text). Whole characters in each word, no word over 75 characters
    and the first no longer than `first`. A reader drops the folding white space between
    adjacent words (RFC 2047 6.2)."""
    room = first - 12  # 12: "=?utf-8?q?" and "?="
    q = text.translate(_Q)  # 1 µs for a name, where a piece per character in Python took 4
    q_size, data = len(q), text.encode()
    if q_size * 3 <= -(-len(data) // 3) * 16:
        if q_size <= room:
            return ["=?utf-8?q?" + q + "?="]
        pieces = [_Q[code] for code in map(ord, text)]
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


def fold(head: str, value: str) -> str | None:
    """`head` + `value` folded at white space into lines of at most 78 characters where the
    value allows; None when some line would still be over 998 (too long a word)."""
    if len(head) + len(value) <= MAX_LINE:
        return head + value
    lines, line = [], head
    for piece in _PIECES.findall(value):
        if len(line) + len(piece) > MAX_LINE and line != head:
            lines.append(line)
            line = piece  # starts with the white space it was folded at
        else:
            line += piece
    lines.append(line)
    return None if max(map(len, lines)) > 998 else "\r\n".join(lines)


@lru_cache(maxsize=256)  # a subject without per-recipient fields is encoded once
def subject_line(subject: str) -> str:
    """The Subject header: raw when it is ASCII and reads back as itself, else encoded words."""
    if not subject:
        return "Subject:"
    if (subject.isascii() and "=?" not in subject and subject[0] not in " \t"
            and subject[-1] not in " \t"):  # a reader drops leading white space
        folded = fold("Subject: ", subject)
        if folded is not None:
            return folded
    return "Subject: " + "\r\n ".join(encoded_words(subject, MAX_EW_LINE - 9))


def mailbox(field: str, name: str, addr: str) -> str:
    """`field: name <addr>` (or the bare address when there is no name), folded. `name` is
    stripped and checked; it goes raw as atoms, else as a quoted-string, else (non-ASCII,
    tabs, "=?" that a reader would decode) as encoded words."""
    head = field + ": "
    if not name:
        return head + addr
    text, limit = None, MAX_LINE
    if "=?" not in name and PRINTABLE.fullmatch(name):
        phrase = name if ATOMS.fullmatch(name) else (
            '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"')
        text = fold(head, phrase)
    if text is None:
        limit = MAX_EW_LINE
        text = head + "\r\n ".join(encoded_words(name, limit - len(head)))
    last = len(text) - text.rfind("\n") - 1
    return text + ("\r\n <" if last + len(addr) + 3 > limit else " <") + addr + ">"


# What keeps an ASCII body from going as 7bit: a control but tab and LF (NUL among them), as NUL
# here, the rest as it is.
_CONTROL_BYTES = bytes(0 if (b < 0x20 and b not in (0x09, 0x0A)) or b == 0x7F else b
                       for b in range(256))


def body(text: str, *, single: bool) -> tuple[bytes, bool]:
    """A body with CRLF line ends and whether it is quoted-printable (else 7bit). Any CR, LF or
    CRLF in `text` is a line break. 7bit when that is safe: ASCII, no control but tab, lines of at
    most 998 octets, no line starting "From " (mbox mangling), not holding the boundary, and for
    a single part, ending with a line break (the message ends with CRLF)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    data = text.encode("ascii") if text.isascii() else None
    # A byte table, not a regex: 16 µs -> about 1 for a 4 KB body.
    if (data is not None and b"\0" not in data.translate(_CONTROL_BYTES)
            and (not single or not text or text[-1] == "\n")
            and not text.startswith("From ") and "\nFrom " not in text and BOUNDARY not in text
            and (len(text) <= 998 or max(map(len, text.split("\n"))) <= 998)):
        return data.replace(b"\n", b"\r\n"), False
    qp = binascii.b2a_qp(text.encode(), istext=True)  # LF line ends: no CR left in text
    if qp.startswith(b"From "):
        qp = b"=46" + qp[1:]
    qp = qp.replace(b"\nFrom ", b"\n=46rom ").replace(b"\n", b"\r\n")
    if single and not qp.endswith(b"\n"):
        qp += b"=\r\n"  # a soft line break: the text ends without one, the message with CRLF
    return qp, True


def text_headers(subtype: str) -> tuple[bytes, bytes]:
    """A text part's Content-Type and Content-Transfer-Encoding lines, 7bit and QP, with the
    blank line that ends them."""
    ctype = f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: '
    return (ctype + "7bit\r\n\r\n").encode(), (ctype + "quoted-printable\r\n\r\n").encode()
