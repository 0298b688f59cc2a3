"""The library's own exceptions. The CLI maps them to messages and exit codes; the library never exits."""

from __future__ import annotations


class BulkmailError(Exception):
    """Base class for every error bulkmail raises on purpose."""


class UsageError(BulkmailError):
    """A user mistake (a flag, a file, a column) found before any email is sent. Exit code 2."""


class CampaignInterrupted(BulkmailError):
    """The run was stopped (SIGINT/SIGTERM) after flushing the ledger; the campaign can be resumed."""

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report
