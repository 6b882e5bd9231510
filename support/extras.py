"""Optional parts of the install: inference needs only the core; caching, plots and the hub come
with extras (`vitscope[cache]`, `vitscope[plots]`, `vitscope[hub]`). A missing one is a one-line
error naming the extra to install, not a traceback."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from vitscope.support.errors import UserError


class MissingExtraError(UserError, ImportError):
    """A command needs a package that only an extra installs."""


def has_module(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import `module`, or say which extra brings it."""
    if not has_module(module):
        raise MissingExtraError(
            f"{needed_for} needs {module}, which is not installed; pip install 'vitscope[{extra}]'"
        )
    return importlib.import_module(module)
