"""Errors that a user can act on. The CLI prints them without a traceback and exits non-zero."""


class GmError(Exception):
    """Base class: the message names the file, key or value at fault."""


class ConfigError(GmError):
    """A params file (or section of it) is malformed: unknown key, wrong type, bad value."""


class DataError(GmError):
    """Input data cannot be used under the configured policy."""
