"""Typed configs from a TOML file and command-line flags, both derived from one frozen dataclass.

Each job has one config dataclass whose fields carry a docstring. `add_config_command` turns the
fields into typer options (`batch_size` -> `--batch-size`, help from the docstring), so no field is
declared twice; values come from the dataclass defaults, then `--config FILE.toml`, then flags.
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
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import tomllib
import typer

C = TypeVar("C")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, by field name."""
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


def parse_field(hint: Any, raw: Any, name: str) -> Any:
    """Turn a TOML or command-line value into the field's type; ValueError names the field."""
    origin = get_origin(hint)
    if origin is tuple:
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        return tuple(parse_field(get_args(hint)[0], item, name) for item in items if item != "")
    if origin is Literal:
        if raw not in get_args(hint):
            raise ValueError(f"{name} must be one of {get_args(hint)}, not {raw!r}")
        return raw
    if hint is bool and isinstance(raw, str):
        return raw.lower() in ("1", "true", "yes")
    try:
        return hint(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {hint.__name__}, not {raw!r}") from None


def load_config(cls: type[C], toml_path: str | Path | None = None, **overrides: Any) -> C:
    """Dataclass defaults, then the TOML file's values, then `overrides` that are not None."""
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    if toml_path is not None:
        with open(toml_path, "rb") as f:
            values.update(tomllib.load(f))
        unknown = sorted(set(values) - set(hints))
        if unknown:
            raise ValueError(
                f"{toml_path}: unknown setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(f.name for f in dataclasses.fields(cls))}"  # type: ignore[arg-type]
            )
    values.update({k: v for k, v in overrides.items() if v is not None})
    parsed = {name: parse_field(hints[name], value, name) for name, value in values.items()}
    missing = [
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.name not in parsed
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise ValueError(f"missing {flags} (or set it in --config)")
    return cls(**parsed)


def add_config_command(
    app: typer.Typer, name: str, cls: type[C], run: Callable[[C], Any], help: str
) -> None:
    """Register `vitscope NAME --config FILE --field-name VALUE ...` that calls run(config)."""
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
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = hints[field.name]
        shown = "" if field.default is dataclasses.MISSING else f" [default: {field.default!r}]"
        option = typer.Option(
            help=docs.get(field.name, "") + shown,
            show_default=False,
        )
        params.append(
            inspect.Parameter(
                field.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[_cli_type(hint) | None, option],
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


def _cli_type(hint: Any) -> Any:
    """Flags carry ints, floats, bools and Literal choices as such; tuples as 'a,b,c' strings."""
    if hint in (int, float, bool) or get_origin(hint) is Literal:
        return hint
    return str


def resolve_device(device: str) -> str:
    """'auto' means the GPU when there is one."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def config_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON-able values (tuples become lists), for attrs and cfg.json."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }
