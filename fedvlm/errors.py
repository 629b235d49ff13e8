"""Exceptions fedvlm raises for bad input, each naming the file, row, key or client at fault."""

from __future__ import annotations


class FedVLMError(Exception):
    """Base class of fedvlm's user-facing errors (the CLI prints them without a traceback)."""


class DataError(FedVLMError, ValueError):
    """A data file, row or value is missing, corrupt or out of range."""


class ConfigError(FedVLMError, ValueError):
    """A recipe or override names an unknown key, a wrong type or an invalid value."""


class FederationError(FedVLMError, RuntimeError):
    """The federation cannot go on (too few clients answered, a resume does not match, ...)."""


class PrivacyBudgetExhausted(FederationError):
    """A client refuses to train: the round would take its ε past ``privacy.max_epsilon``.

    The server stops the run when a client's error carries :attr:`MARKER` (the only channel a
    client's exception has through Flower is its message), see :meth:`raised_in`.

    Example:
        >>> error = PrivacyBudgetExhausted("client 3 has spent ε=7.9")
        >>> str(error), PrivacyBudgetExhausted.raised_in(f"ClientApp raised: {error}")
        ('privacy budget exhausted: client 3 has spent ε=7.9', True)
    """

    MARKER = "privacy budget exhausted"

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.MARKER}: {detail}")

    @classmethod
    def raised_in(cls, reason: str) -> bool:
        """Whether a client's error message ``reason`` is this exception's."""
        return f"{cls.MARKER}: " in reason
