"""What a command may write to: checked before any work, so nothing it did not make is replaced.

The rule, for every command: an output path is new, an empty folder, or the command's own
earlier output (recognised by its `Own` marker: a file only that command writes, or a PNG's
Software text); anything else is refused unless `--overwrite` says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vitscope.support.errors import BadSetting, OutputExists


@dataclass(frozen=True)
class Own:
    """How a command recognises its own earlier output, which it may write again."""

    what: str
    """What that output is, for the error message: "an analysis folder"."""
    test: Callable[[Path], bool]
    """True for a path (that exists) the command wrote."""


def holding(what: str, *patterns: str) -> Own:
    """A folder recognised by a file inside (a name or glob pattern) that only its command
    writes."""
    return Own(what, lambda folder: any(next(folder.glob(p), None) for p in patterns))


def json_with(what: str, *keys: str, value: object = None, inside: str = "") -> Own:
    """A JSON file (or the file `inside` a folder) recognised by a key only its command writes:
    `keys` is a path of nested keys; with `value`, the last must hold it."""

    def test(path: Path) -> bool:
        try:
            data = json.loads((path / inside if inside else path).read_text())
            for key in keys:
                data = data[key]
        except (ValueError, OSError, TypeError, KeyError):
            return False
        return value is None or data == value

    return Own(what, test)


def png_by(what: str) -> Own:
    """A PNG written with `png_metadata(what)`."""

    def test(path: Path) -> bool:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                return getattr(image, "text", {}).get("Software") == f"vitscope: {what}"
        except (OSError, UnidentifiedImageError):
            return False

    return Own(what, test)


def png_metadata(what: str) -> dict[str, str]:
    """matplotlib savefig metadata that marks a PNG as `what`, for `png_by(what)`."""
    return {"Software": f"vitscope: {what}"}


def check_output_path(
    path: Path | str,
    flag: str,
    folder: bool = True,
    overwrite: bool = False,
    own: Own | None = None,
) -> None:
    """Refuse, before any work, an output that cannot or may not be written: a file where a
    folder must be (the path itself for a folder output, or any folder above it), a folder where
    a file must be, or (without `overwrite`) an existing one that is neither an empty folder nor
    `own`. URLs (object storage) are checked where they are opened."""
    path = Path(path)
    if "://" in str(path):
        return
    if not folder and path.is_dir():
        raise BadSetting(f"{path}: expected a file to write, found a folder; choose another {flag}")
    for above in (path, *path.parents) if folder else path.parents:
        if above.is_file():
            found = "a file" if above == path else f"a file at {above}"
            raise BadSetting(
                f"{path}: expected a folder to write into, found {found}; choose another {flag}"
            )
        if above.exists():
            break
    if overwrite or not path.exists() or (folder and not any(path.iterdir())):
        return
    if own is not None and own.test(path):
        return
    expected = "a new or empty folder" if folder else "a new file"
    found = "a folder of other files" if folder else "another file"
    if own is not None:
        expected += f", or {own.what} to write again"
        found = f"{found} (not {own.what})"
    raise OutputExists(
        f"expected {expected}, found {found}",
        path=path,
        fix=f"choose another {flag}, or pass --overwrite to write into it anyway",
    )
