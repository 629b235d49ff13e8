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
