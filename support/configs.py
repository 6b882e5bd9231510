"""Typed configs: one frozen dataclass per job, filled from defaults, a TOML file and overrides.

Numeric fields declare their lower bound in their type (`Annotated[int, AtLeast(1)]`), and each
config's `__post_init__` calls `check_bounds`, so a bad value is refused in one line whether it
came from a flag, a TOML file or Python, and a test can find every bound by introspection.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import tomllib

from vitscope.support.errors import BadSetting

C = TypeVar("C")


@dataclass(frozen=True)
class AtLeast:
    """The field's value must be >= `value`."""

    value: float

    def admits(self, x: float) -> bool:
        return x >= self.value

    def __str__(self) -> str:
        return f"at least {self.value:g}"


@dataclass(frozen=True)
class Above:
    """The field's value must be > `value` (for rates and fractions that may not be zero)."""

    value: float

    def admits(self, x: float) -> bool:
        return x > self.value

    def __str__(self) -> str:
        return f"above {self.value:g}"


Bound = AtLeast | Above


def field_bounds(cls: type) -> dict[str, Bound]:
    """The declared lower bound of each numeric field, by field name."""
    hints = get_type_hints(cls, include_extras=True)
    bounds = {}
    for name, hint in hints.items():
        for extra in getattr(hint, "__metadata__", ()):
            if isinstance(extra, AtLeast | Above):
                bounds[name] = extra
    return bounds


def check_bounds(config: Any) -> None:
    """BadSetting naming the first field whose value is below its declared bound."""
    for name, bound in field_bounds(type(config)).items():
        value = getattr(config, name)
        if not bound.admits(value):
            raise BadSetting(f"{name} must be {bound}, not {value!r}")


def parse_field(hint: Any, raw: Any, name: str) -> Any:
    """Turn a TOML or command-line value into the field's type; BadSetting names the field."""
    origin = get_origin(hint)
    if origin is tuple:
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        return tuple(parse_field(get_args(hint)[0], item, name) for item in items if item != "")
    if origin is Literal:
        if raw not in get_args(hint):
            raise BadSetting(f"{name} must be one of {get_args(hint)}, not {raw!r}")
        return raw
    if hint is bool and isinstance(raw, str):
        return raw.lower() in ("1", "true", "yes")
    try:
        return hint(raw)
    except (TypeError, ValueError):
        raise BadSetting(f"{name} must be {hint.__name__}, not {raw!r}") from None


def load_config(cls: type[C], toml_path: str | Path | None = None, **overrides: Any) -> C:
    """Dataclass defaults, then the named preset's values (a config class's PRESETS, chosen by
    its `preset` field), then the TOML file's values, then `overrides` that are not None."""
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    if toml_path is not None:
        with open(toml_path, "rb") as f:
            values.update(tomllib.load(f))
        unknown = sorted(set(values) - set(hints))
        if unknown:
            raise BadSetting(
                f"{toml_path}: unknown setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(f.name for f in dataclasses.fields(cls))}"  # type: ignore[arg-type]
            )
    values.update({k: v for k, v in overrides.items() if v is not None})
    presets = getattr(cls, "PRESETS", {})
    if presets and "preset" in values:  # a named preset's values, under the explicit ones
        values = {**presets[parse_field(hints["preset"], values["preset"], "preset")], **values}
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
        raise BadSetting(f"missing {flags} (or set it in --config)")
    return cls(**parsed)


def config_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON-able values (tuples become lists), for attrs and cfg.json."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }
