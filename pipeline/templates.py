"""Message templates: Jinja2 in a sandbox, checked before Ray starts; recipient values are data,
never template code.

Templates (subject, body, unsubscribe URL) are compiled once per process by the composer
(compose.py); a recipient's fields are only ever passed as render *values*, so a name of
`{{ 7*7 }}` is printed as those nine characters, never evaluated. HTML bodies are autoescaped.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from email.utils import parseaddr
from functools import lru_cache
from typing import Any, overload

from jinja2 import Environment, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import escape

from .config import MessageConfig, SendConfig
from .errors import UsageError
from .messages import HEADER_UNSAFE

BUILTIN_FIELDS = ("id", "email", "campaign")


def _finalize(value: Any) -> Any:
    # A null in the input prints as nothing, not as the word "None".
    return "" if value is None else value


@lru_cache(maxsize=8)
def environment(autoescape: bool = False) -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(autoescape=autoescape, keep_trailing_newline=True,
                                         finalize=_finalize)


def referenced_fields(source: str) -> set[str]:
    """The variables a template names (fields it needs from each recipient row)."""
    return set(meta.find_undeclared_variables(environment().parse(source)))


_MISSING = object()


class Fill:
    """A template that is only text and bare `{{ name }}`s, rendered by joining strings: 1.8 µs
    for the benchmark's three-field body against Jinja2's 6.4 (and 16 through
    `Template.render`). Each value goes through what Jinja2's compiled code applies, the
    environment's finalize (`_finalize`) then `str`, or `escape` when it autoescapes;
    tests/test_templates.py checks the output against Jinja2's over arbitrary values."""

    __slots__ = ("texts", "names", "_convert")

    def __init__(self, texts: tuple[str, ...], names: tuple[str, ...], *, autoescape: bool) -> None:
        self.texts, self.names = texts, names  # texts[i] precedes names[i]; one text more
        self._convert = escape if autoescape else str

    def __call__(self, fields: Mapping[str, Any], builtins: Mapping[str, Any],
                 globals_: Mapping[str, Any]) -> str | None:
        """The text, values looked up as a render's context would (`fields` over `builtins`
        over the template's globals, an unknown name as nothing); None for a name that only a
        global answers (left to Jinja2)."""
        texts, convert = self.texts, self._convert
        out = [texts[0]]
        for i, name in enumerate(self.names, 1):
            value = fields.get(name, _MISSING)
            if value is _MISSING:
                value = builtins.get(name, _MISSING)
                if value is _MISSING:
                    if name in globals_:
                        return None
                    value = ""
            out += ("" if value is None else convert(value), texts[i])
        return "".join(out)


def fill(env: Environment, source: str) -> Fill | None:
    """`source` as a `Fill` when it is only text and bare names; else None (Jinja2 renders it)."""
    body = env.parse(source).body
    if not body:
        return Fill(("",), (), autoescape=bool(env.autoescape))
    output = body[0]
    if len(body) > 1 or not isinstance(output, nodes.Output):
        return None
    texts, names, text = [], [], ""
    for node in output.nodes:
        if isinstance(node, nodes.TemplateData):
            text += node.data
        elif isinstance(node, nodes.Name) and node.ctx == "load" and node.name != "self":
            # (`self` is the template itself to Jinja2, never a context value)
            texts.append(text)
            names.append(node.name)
            text = ""
        else:
            return None
    return Fill((*texts, text), tuple(names), autoescape=bool(env.autoescape))


def _html_sibling(template: str) -> str | None:
    html = os.path.splitext(template)[0] + ".html"
    return html if html != template and os.path.exists(html) else None


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _sources(message: MessageConfig) -> list[tuple[str, str]]:
    out = [("--subject", message.subject)]
    if message.unsubscribe_url:
        out.append(("--unsubscribe-url", message.unsubscribe_url))
    if message.template:
        if not os.path.isfile(message.template):
            raise UsageError(f"--template {message.template}: no such file")
        try:
            out.append((f"--template {message.template}", _read(message.template)))
            html = _html_sibling(message.template)
            if html:
                out.append((f"--template {html}", _read(html)))
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--template {message.template}: cannot read it ({exc})") from None
    return out


@overload
def with_bodies(config: SendConfig) -> SendConfig: ...
@overload
def with_bodies(config: MessageConfig) -> MessageConfig: ...
def with_bodies(config: SendConfig | MessageConfig) -> SendConfig | MessageConfig:
    """`config` with the template files' text filled in (`body`, `html_body`), read here once."""
    if isinstance(config, SendConfig):
        return dataclasses.replace(config, message=with_bodies(config.message))
    if config.template is None or config.body is not None:
        return config
    html = _html_sibling(config.template)
    return dataclasses.replace(config, body=_read(config.template),
                               html_body=_read(html) if html else None)


def check_fields(message: MessageConfig, columns: list[str]) -> None:
    """Fail before Ray starts when a template names a field the input does not have, does not
    parse, or `--from` is not an address."""
    _, addr = parseaddr(message.from_addr)
    if "@" not in addr or HEADER_UNSAFE.search(message.from_addr):
        raise UsageError(f"--from {message.from_addr!r}: not an email address "
                         "(e.g. 'News <news@example.com>')")
    available = set(columns) | set(BUILTIN_FIELDS)
    for where, source in _sources(message):
        try:
            names = referenced_fields(source)
        except Exception as exc:  # noqa: BLE001 - jinja2.TemplateSyntaxError and friends
            raise UsageError(f"{where}: template does not parse ({exc})") from None
        missing = sorted(names - available)
        if missing:
            raise UsageError(f"{where}: names field {missing[0]!r}, which the input does not have "
                             f"(columns: {', '.join(sorted(columns))})")


def header_fields(message: MessageConfig) -> set[str]:
    """Input fields that end up in a header (To's display name, Subject, List-Unsubscribe)."""
    out = {"name"} | referenced_fields(message.subject)
    if message.unsubscribe_url:
        out |= referenced_fields(message.unsubscribe_url)
    return out
