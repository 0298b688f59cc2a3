"""Message templates: Jinja2 in a sandbox; recipient values are data, never template code."""

from __future__ import annotations

from functools import lru_cache

from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .config import MessageConfig, SendConfig
from .errors import UsageError


@lru_cache(maxsize=8)
def environment(autoescape: bool = False) -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(autoescape=autoescape, keep_trailing_newline=True)


def referenced_fields(source: str) -> set[str]:
    """The variables a template names (fields it needs from each recipient row)."""
    return set(meta.find_undeclared_variables(environment().parse(source)))


def _sources(message: MessageConfig) -> list[tuple[str, str]]:
    out = [("--subject", message.subject)]
    if message.unsubscribe_url:
        out.append(("--unsubscribe-url", message.unsubscribe_url))
    if message.template:
        import os
        if not os.path.exists(message.template):
            raise UsageError(f"--template {message.template}: no such file")
        with open(message.template, encoding="utf-8") as f:
            out.append((f"--template {message.template}", f.read()))
        html = os.path.splitext(message.template)[0] + ".html"
        if os.path.exists(html) and html != message.template:
            with open(html, encoding="utf-8") as f:
                out.append((f"--template {html}", f.read()))
    return out


def check_fields(message: MessageConfig, columns: list[str]) -> None:
    """Fail before Ray starts when a template names a field the input does not have."""
    available = set(columns) | {"id", "email", "campaign"}
    for where, source in _sources(message):
        try:
            names = referenced_fields(source)
        except Exception as exc:  # noqa: BLE001 - jinja2.TemplateSyntaxError and friends
            raise UsageError(f"{where}: template does not parse ({exc})") from None
        missing = sorted(names - available)
        if missing:
            raise UsageError(f"{where}: names field {missing[0]!r}, which the input does not have "
                             f"(columns: {', '.join(sorted(columns))})")


def write_dry_run(frame: object, run_dir: str, campaign: str, send: SendConfig) -> int:
    raise UsageError("--dry-run needs the SMTP message composer (not built yet)")
