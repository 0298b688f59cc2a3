"""bulkmail: send an email to every recipient of a huge Parquet list, resumably, on Ray."""

from .config import CampaignConfig, MessageConfig, RetryPolicy, SendConfig, SmtpConfig
from .errors import BulkmailError, CampaignInterrupted, UsageError

__all__ = ["BulkmailError", "CampaignConfig", "CampaignInterrupted", "MessageConfig",
           "RetryPolicy", "SendConfig", "SmtpConfig", "UsageError"]
