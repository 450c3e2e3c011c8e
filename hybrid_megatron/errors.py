"""Exception types raised for user mistakes (bad config, bad inputs)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


class BackendUnavailableError(RuntimeError):
    """A requested kernel/backend/feature is not available here; the message names the fix."""


class GenerationCheckError(RuntimeError):
    """Cached decoding disagrees with decoding by full forwards: every answer would be wrong."""


class DiskFullError(RuntimeError):
    """A write failed for lack of disk space; the message says what was kept and what is needed."""
