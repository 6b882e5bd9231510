"""Command-line options derived from a config dataclass, so no field is declared twice.

`add_config_command` turns the fields into typer options (`batch_size` -> `--batch-size`, help
from the docstring under the field); values come from the dataclass defaults, then
`--config FILE.toml`, then flags.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_origin, get_type_hints

import tomllib
import typer

from vitscope.support.configs import load_config

C = TypeVar("C")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, by field name, its own fields' and
    those it inherits (shared settings, support/shared_options.py)."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            docs.update(_own_field_docs(base))
    return docs


@cache
def _own_field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def add_config_command(
    app: typer.Typer,
    name: str,
    cls: type[C],
    run: Callable[[C], Any],
    help: str,
    arguments: tuple[str, ...] = (),
) -> None:
    """Register `vitscope NAME [ARGUMENTS] --config FILE --field-name VALUE ...` that calls
    run(config); the fields named in `arguments` are positional."""
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Path | None, typer.Option(help="TOML file of settings; flags override it.")
            ],
        )
    ]
    own = vars(cls).get("__annotations__", {})
    # The command's own settings first, then the shared ones it inherits (shards, device, ...).
    fields = sorted(dataclasses.fields(cls), key=lambda f: f.name not in own)  # type: ignore[arg-type]
    for field in fields:
        hint = hints[field.name]
        shown = "" if field.default is dataclasses.MISSING else f" [default: {field.default!r}]"
        kind = typer.Argument if field.name in arguments else typer.Option
        option = kind(help=docs.get(field.name, "") + shown, show_default=False)
        params.append(
            inspect.Parameter(
                field.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[_cli_type(hint, kind is typer.Argument) | None, option],
            )
        )

    def command(**kwargs: Any) -> None:
        config_file = kwargs.pop("config")
        try:
            config = load_config(cls, config_file, **kwargs)
        except (ValueError, OSError, tomllib.TOMLDecodeError) as err:
            raise typer.BadParameter(str(err)) from None
        run(config)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    app.command(name, help=help)(command)


def _cli_type(hint: Any, argument: bool) -> Any:
    """Flags carry ints, floats, bools and Literal choices as such, tuples as 'a,b,c' strings; a
    tuple argument takes the rest of the command line (`vitscope compare RUN RUN ...`)."""
    if hint in (int, float, bool) or get_origin(hint) is Literal:
        return hint
    if argument and get_origin(hint) is tuple:
        return list[str]
    return str
