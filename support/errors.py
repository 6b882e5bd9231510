"""Errors a user can cause, all under one base class.

The `vitscope` command prints a `UserError` as one line (what, where, the fix) and exits 1; any
other exception is a bug and keeps its traceback. The subclasses that also derive from a builtin
(`BadSetting` from ValueError, `MissingInput` from FileNotFoundError, ...) let library callers
catch what they already catch.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Caused by input or environment, not by a bug: a bad setting, a missing or broken file, a
    server that cannot be reached. Its message names the file or flag and says the fix."""

    def __init__(self, message: str, *, path: Path | str | None = None, fix: str = "") -> None:
        self.path = Path(path) if isinstance(path, str) and "://" not in path else path
        where = f"{path}: " if path is not None else ""
        super().__init__(f"{where}{message}; {fix}" if fix else f"{where}{message}")

    def __reduce__(self) -> tuple:
        """Pickled as its message, so it comes back intact from a reader process."""
        return (_rebuilt, (type(self), self.path, str(self)))


def _rebuilt(cls: type[UserError], path: Path | str | None, message: str) -> UserError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.path = path
    return error


class BadSetting(UserError, ValueError):
    """A flag, TOML key or argument outside what the command accepts."""


class MissingInput(UserError, FileNotFoundError):
    """An input file or folder that is not there."""


class OutputExists(UserError, FileExistsError):
    """An output would replace something the command did not create (pass --overwrite)."""


class Unreachable(UserError, ConnectionError):
    """A server (hub, judge endpoint, object store) could not be reached or refused."""
