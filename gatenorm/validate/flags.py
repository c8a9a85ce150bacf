"""Command-line flags generated from the validation-settings model: each field is one flag with the model's
default and description (``--ctx``, ``--bench-runs``, ``--passkey-lengths``, gates as ``--max-kld``), lists as
comma-separated text, the optional benchmark as a ``--bench`` switch. A new setting is one field."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from gatenorm.errors import GatenormError
from gatenorm.validate.settings import ValidationSettings

#: Nested models whose fields become ``--{prefix}{field}`` flags ("" for the gates: ``--max-kld``).
PREFIXES = {"bench": "bench-", "passkey": "passkey-", "gates": ""}
#: Optional nested models given by a switch (off: None), with the switch's help.
SWITCHES = {"bench": "Also measure latency, RSS and file size."}


@dataclass(frozen=True)
class Flag:
    """One generated flag: where its value goes in the settings (`path`), its option name and its kind."""

    path: tuple[str, ...]
    option: str
    param: str
    kind: str  # "value", "list", "switch"
    item: type | None = None


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def _default(info: FieldInfo) -> Any:
    return info.default_factory() if info.default_factory is not None else info.default


def _flags(
    model: type[BaseModel], path: tuple[str, ...] = (), prefix: str = "", exclude: Collection[str] = ()
) -> list[tuple[Flag, Any]]:
    """Every flag of `model` (but its fields in `exclude`) with its typer parameter (name, annotation,
    default); the parameter names start with `prefix`'s words too (``heal_samples``)."""
    out = []
    for name, info in model.model_fields.items():
        if name in exclude:
            continue
        kind, optional = _unwrap(info.annotation)
        where = (*path, name)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            if name in SWITCHES:
                flag = Flag(where, f"--{name}", "_".join(where), "switch")
                on = _default(info) is not None
                out.append((flag, (bool, typer.Option(flag.option, help=SWITCHES[name]), on)))
            out += _flags(kind, where, PREFIXES.get(name, f"{name}-"))
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        option = str(extra.get("flag") or f"--{prefix}{name.replace('_', '-')}")
        param = "_".join(where) if path else prefix.replace("-", "_") + name
        default = _default(info)
        if typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            item = typing.get_args(item)[0] if typing.get_origin(item) is Annotated else item
            flag = Flag(where, option, param, "list", item)
            text = ",".join(map(str, default)) if default else "none"
            help_ = f"{info.description or ''} Comma-separated.".strip()
            out.append((flag, (str, typer.Option(option, help=help_), text)))
        else:
            if kind is bool and "/" not in option and extra.get("negatable", True):
                option = f"{option}/--no-{option.removeprefix('--')}"
            flag = Flag(where, option, param, "value")
            annotation = kind | None if optional else kind
            out.append((flag, (annotation, typer.Option(option, help=info.description), default)))
    return out


def _list(flag: Flag, text: str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip() and t.strip() != "none"]
    try:
        return [flag.item(t) for t in items] if flag.item in (int, float) else items
    except ValueError:
        raise GatenormError(f"{flag.option} {text!r}: expected comma-separated numbers") from None


def settings_from_flags(flags: list[Flag], values: dict[str, Any], model: type[BaseModel]) -> BaseModel:
    """The settings the generated flags' `values` give; one line naming the flag if one is wrong."""
    doc: dict[str, Any] = {}
    off = {f.path for f in flags if f.kind == "switch" and not values[f.param]}
    for flag in flags:
        if flag.kind == "switch" or any(flag.path[: len(p)] == p for p in off):
            continue
        node = doc
        for key in flag.path[:-1]:
            node = node.setdefault(key, {})
        value = values[flag.param]
        node[flag.path[-1]] = _list(flag, value) if flag.kind == "list" else value
    for path in off:
        doc[path[0]] = None
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        error = e.errors()[0]
        loc = tuple(str(part) for part in error["loc"] if not isinstance(part, int))
        option = next((f.option.split("/")[0] for f in flags if f.path == loc), ".".join(loc))
        raise GatenormError(f"{option}: {error['msg'].removeprefix('Value error, ')}") from None


def with_settings_flags(
    command: Callable[..., None],
    model: type[BaseModel] = ValidationSettings,
    param: str = "settings",
    prefix: str = "",
    exclude: Collection[str] = (),
) -> Callable[..., None]:
    """A typer command whose flags are `command`'s own parameters (all but `param`) plus one per setting of
    `model` (``--{prefix}{field}``, but the fields in `exclude`, which keep their defaults); `command` is
    called with `param` = the model built from them. Wrappers stack: one model per parameter."""
    generated = _flags(model, prefix=prefix, exclude=exclude)
    flags = [flag for flag, _ in generated]
    own = [p for p in inspect.signature(command).parameters.values() if p.name != param]
    hints = typing.get_type_hints(command, include_extras=True)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]
    params = own + [
        inspect.Parameter(
            flag.param, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]
        )
        for flag, (kind, option, default) in generated
    ]

    @functools.wraps(command)
    def run(**kwargs: Any) -> None:
        values = {f.param: kwargs.pop(f.param) for f in flags}
        command(**{param: settings_from_flags(flags, values, model)}, **kwargs)

    # typer reads the signature and the (evaluated) annotations: the generated ones, not `command`'s
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    del run.__wrapped__
    return run
