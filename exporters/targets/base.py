"""What an export target is: an `ExportTarget` (options model, quant parsing, export function, artifact
path, validation runtimes, model-card usage, the plan actions each architecture supports), added to
`TARGETS` with `register_target`. The CLI (``gatenorm export --to``), `exporters.export.export`, recipes
(schema, batch, build, card) ask this table; nothing else names a target."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field, create_model
from pydantic.fields import FieldInfo

from gatenorm.architectures import Architecture
from gatenorm.errors import GatenormError
from gatenorm.plan import LayerAction, Plan
from gatenorm.readers import Checkpoint

#: Called by an exporter once its output is complete, before moving it to OUT: raises if the plan turned
#: out not to belong to the model (its content hash is checked while the exporter works).
BeforeCommit = Callable[[], None]
#: (checkpoint, plan, out, quant, before_commit, **options) -> the written artifact.
ExportFn = Callable[..., Path]


@dataclass(frozen=True)
class ExportTarget:
    """One export format."""

    name: str
    #: writes the artifact (atomically: nothing at `out` on failure)
    export: ExportFn
    #: a quant name as this target spells it (one line naming the known ones if unknown)
    parse_quant: Callable[[str], str]
    #: the plan actions this target writes for an architecture, and why the others are not (or "")
    actions: Callable[[type[Architecture]], tuple[set[LayerAction], str]]
    #: a recipe's ``exports.<name>`` model, and its exports: (quant, exporter options) per artifact
    options: type[BaseModel]
    variants: Callable[[BaseModel], list[tuple[str, dict[str, int | bool]]]]
    #: the artifact inside a variant's folder, from the variant's name
    artifact: Callable[[str], str]
    #: (reference runtime, candidate runtime) of a variant, given whether the source is a GGUF file
    runtimes: Callable[[bool], tuple[str, str]]
    #: the model card's "Use" section, given the artifact's path inside the folder
    usage: Callable[[str], str]
    #: ``gatenorm export --quant`` help for this target
    quant_help: str
    #: checks that name the family, action and reason, run before anything is read or written
    check: Callable[[Checkpoint, Plan], None] = lambda _ckpt, _plan: None
    #: the exporter's keyword options, one field each (default: not given): ``gatenorm export`` offers a
    #: flag per field, its description the help (`export_flags_model`); None: the exporter takes none
    flags: type[BaseModel] | None = None
    #: quant types of the unpruned model only (the quantization ladder of a recipe)
    ladder: Callable[[BaseModel], list[str]] = lambda _options: []
    #: front-matter lines of the model card (e.g. ``library_name``)
    card_front_matter: tuple[str, ...] = ()
    #: exporter options a recipe rebuild passes (replace a stale artifact of an older key)
    rebuild_options: dict[str, bool] = field(default_factory=dict)

    def check_options(self, options: Mapping[str, object]) -> None:
        """Refuse exporter options this target does not declare in `flags`: one line naming the targets
        that take the option."""
        known = self.flags.model_fields if self.flags is not None else {}
        for name in options:
            if name not in known:
                owners = [
                    t.name for t in TARGETS.values() if t.flags is not None and name in t.flags.model_fields
                ]
                flag = f"--{name.replace('_', '-')}"
                if owners:
                    raise GatenormError(f"{flag} applies to --to {' or '.join(owners)} only")
                raise GatenormError(f"{flag}: no export target takes this option")

    def require(self, arch: type[Architecture], plan: Plan) -> None:
        """Refuse `plan` if it uses an action this target cannot write for `arch` (`Plan.require`)."""
        supported, reason = self.actions(arch)
        plan.require(supported, f"the {self.name} exporter ({arch.name}{f': {reason}' if reason else ''})")


#: target name -> ExportTarget, in registration order; the target modules are imported by the package.
TARGETS: dict[str, ExportTarget] = {}


def register_target(target: ExportTarget) -> ExportTarget:
    """Add `target` to `TARGETS` (a GatenormError if its name is taken)."""
    if target.name in TARGETS:
        raise GatenormError(f"export target {target.name!r} is registered twice")
    TARGETS[target.name] = target
    return target


def unregister_target(name: str) -> None:
    """Remove a target (tests that register a throw-away one)."""
    TARGETS.pop(name, None)


def export_flags_model() -> type[BaseModel]:
    """One model with every registered target's exporter options (`ExportTarget.flags`), a field declared
    by several targets once: what ``gatenorm export`` generates its target flags from
    (`gatenorm.validate.flags`). Each field's help names the targets that take it."""
    fields: dict[str, tuple[object, FieldInfo]] = {}
    helps: dict[str, list[str]] = {}
    for target in TARGETS.values():
        for name, info in (target.flags.model_fields if target.flags is not None else {}).items():
            if name in fields and fields[name][0] != info.annotation:
                raise GatenormError(
                    f"export option {name!r} of {target.name} has another type than the same option of "
                    f"{', '.join(helps[name])}"
                )
            fields.setdefault(name, (info.annotation, info))
            helps.setdefault(name, []).append(f"{target.name}: {(info.description or name).rstrip('.')}")

    def field(name: str, info: FieldInfo) -> FieldInfo:
        help_ = "; ".join(helps[name]) + "."
        return Field(info.default, description=help_, json_schema_extra=info.json_schema_extra)

    return create_model(
        "ExportFlags",
        **{name: (annotation, field(name, info)) for name, (annotation, info) in fields.items()},
    )


class UnknownTarget(GatenormError, ValueError):
    """No export target of that name (a bad value: one line, exit 2)."""


def target_spec(name: str) -> ExportTarget:
    """The target called `name`; one line naming the known ones if there is none."""
    name = str(getattr(name, "value", name))
    if name not in TARGETS:
        raise UnknownTarget(f"unknown export target {name!r} (known: {', '.join(TARGETS)})")
    return TARGETS[name]
