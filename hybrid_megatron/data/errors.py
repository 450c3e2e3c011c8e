"""Errors raised by the data layer for user mistakes (bad files, bad arguments)."""

from hybrid_megatron.errors import ConfigError


class DataError(ConfigError):
    """A data input is missing, malformed or inconsistent; the message names the file and the fix.

    Subclasses `ConfigError` so one top-level handler can print every user mistake cleanly.
    """
