"""Errors a user can act on. The CLI prints them as one line and exits 2; the server
turns them into HTTP 400 bodies. Anything else is a bug and keeps its traceback."""


class VGSError(ValueError):
    """Bad input or configuration, with a message meant for the user."""


class ConfigError(VGSError):
    """A config field is out of range or inconsistent with another one."""
