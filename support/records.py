"""JSON records on disk (cache attributes, commit records, SAE cards): parsed field by field, so a
bad file gets an error naming the file, the field and what was expected; written atomically.

Each file format has its own error type (a `FileFormatError`) so callers can tell them apart.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from vitscope.support.errors import UserError


class FileFormatError(UserError):
    """A file does not match its format: says where, what was expected, what was found, the fix."""

    def __init__(self, path: Path | str, expected: str, found: str, fix: str = "") -> None:
        super().__init__(f"expected {expected}, found {found}", path=path, fix=fix)


def parse_record(
    cls: type, data: Any, where: Path | str, what: str, error: type[FileFormatError]
) -> Any:
    """Build a record field by field, so a bad file gets an error naming the field."""
    if not isinstance(data, dict):
        raise error(where, f"a JSON object with the {what}", type(data).__name__)
    hints = get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if field.name not in data:
            if field.default is not dataclasses.MISSING:
                continue
            raise error(where, f"{what} field {field.name!r}", "no such field")
        value = data[field.name]
        if isinstance(value, list):
            value = tuple(value)
        if not _has_type(value, hints[field.name]):
            expected = f"{what} field {field.name!r} to be {_type_name(hints[field.name])}"
            raise error(where, expected, repr(value))
        values[field.name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise error(where, f"valid {what}", str(err)) from None


def _has_type(value: Any, hint: Any) -> bool:
    """isinstance for the annotations records use: str, int, float, dict, Literal, X | None and
    tuple[T, ...]."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_has_type(value, option) for option in get_args(hint))
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in get_args(hint)
    if origin is tuple:
        item = get_args(hint)[0]
        return isinstance(value, tuple) and all(_has_type(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(option) for option in get_args(hint))
    if hint is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, get_args(hint)))
    if origin is tuple:
        return f"a list of {_type_name(get_args(hint)[0])}"
    if origin is dict:
        return "an object"
    return hint.__name__


def read_json(path: Path, error: type[FileFormatError]) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise error(path, "a file", "nothing") from None
    return parse_json(text, path, error)


def parse_json(text: str, where: Path | str, error: type[FileFormatError]) -> Any:
    """JSON read from `where` (a path or URL), or `error` naming it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(where, "JSON", f"unparseable text ({err})") from None


def absolute(location: str) -> str:
    """A local path made absolute, so that a record's paths (a run's cache, an analysis's SAE
    and cache) open from anywhere: another folder, a notebook; URLs and hub ids as they are."""
    path = Path(location)
    return str(path.resolve()) if "://" not in location and path.exists() else location


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: readers see all or nothing."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomically(path: Path, data: Any) -> None:
    write_atomically(path, json.dumps(data, indent=2).encode())
