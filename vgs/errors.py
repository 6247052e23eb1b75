"""Errors a user can act on. The CLI prints them as one line and exits 2; the server
turns them into HTTP 400 bodies. Anything else is a bug and keeps its traceback."""


class VGSError(ValueError):
    """Bad input or configuration, with a message meant for the user. `param` names the
    offending field when there is one (the server puts it in the OpenAI error body)."""

    def __init__(self, message: str = "", param: str | None = None):
        super().__init__(message)
        self.param = param


class ConfigError(VGSError):
    """A config field is out of range or inconsistent with another one."""
