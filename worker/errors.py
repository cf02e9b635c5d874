"""Provider failures, classified by what the engine must do about them."""

from __future__ import annotations


class ProviderError(Exception):
    """Base of every classified provider failure."""


class Transient(ProviderError):
    """Not accepted, worth retrying later (connection refused, 5xx): counts as an attempt."""


class Throttled(ProviderError):
    """The provider asked us to slow down: retry later, not an attempt, drain the bucket."""


class RecipientRejected(ProviderError):
    """Permanent for this recipient (MessageRejected, bad request): the recipient fails."""


class OutcomeUnknown(ProviderError):
    """The request went out and no answer came back: maybe sent, never re-sent blindly."""


class AccountBlocked(ProviderError):
    """Account-level trouble (quota, suspended, paused sending): pause the broadcast."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Stopped(ProviderError):
    """Not sent: the call's group was stopped (a throttle, account-level trouble) while the
    call waited in the pacer; raised before any byte of the request was written."""


class NotCalled(ProviderError):
    """Never sent: the call was too late for its slot in the rate limit's wire schedule
    (raised where the request would leave). Put back, no attempt counted."""


class Unsupported(ProviderError):
    """Never sent: the provider does not serve this kind of call (an endpoint without
    SendBulkEmail). Put back, no attempt counted: it goes again one message per call."""


class ConfigError(Exception):
    """The worker's configuration is unusable (bad provider name, bad flag)."""
