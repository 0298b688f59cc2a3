"""`--dry-run`: render the first N messages as .eml files under the run directory; send nothing."""

from __future__ import annotations

from typing import Any

from . import storage
from .compose import ComposeError, Composer
from .config import SendConfig
from .errors import UsageError
from .messages import Message, id_domain, message_id


def write_dry_run(frame: Any, run_dir: str, campaign: str, send: SendConfig) -> int:
    """Render each row of `frame` (polars: id, email, fields) as `<run_dir>/dry-run/<id>.eml`;
    send nothing. Returns how many files were written. An earlier dry run's files are replaced."""
    composer = Composer(send.message, campaign=campaign)
    domain = id_domain(send.message.from_addr)
    out_dir = storage.join(run_dir, "dry-run")
    storage.delete_dir(out_dir)
    storage.makedirs(out_dir)
    written = 0
    for row in frame.iter_rows(named=True):
        rid = int(row.pop("id"))
        to = str(row.pop("email"))
        msg = Message(rid, to, message_id(campaign, rid, domain), row)
        try:
            env = composer.envelope(msg)
        except ComposeError as exc:
            raise UsageError(f"--dry-run: the message for id {rid} cannot be built: {exc}") from None
        storage.write_bytes(storage.join(out_dir, f"{rid}.eml"), env.data)
        written += 1
    return written
