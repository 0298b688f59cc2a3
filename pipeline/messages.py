"""What one email is: the recipient, its deterministic Message-ID, and its template fields.

Rendering (subject/body templates, MIME) happens only where content is needed (SMTP, dry
run), so the fake sender's benchmark measures the pipeline, not Jinja2.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parseaddr
from typing import Any


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    to: str
    message_id: str
    fields: Mapping[str, Any]


def message_id(campaign: str, recipient_id: int, domain: str) -> str:
    """Deterministic: the same campaign and recipient always give the same Message-ID, so a
    provider or the receiving side can drop a duplicate caused by a crash-and-resume."""
    return f"<{campaign}.{recipient_id}@{domain}>"


def id_domain(from_addr: str) -> str:
    """The right-hand side for Message-IDs: the sender's domain."""
    _, addr = parseaddr(from_addr)
    domain = addr.rpartition("@")[2].strip()
    return domain or "bulkmail.invalid"
