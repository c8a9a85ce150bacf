"""One registry of per-family specs for each exporter (`exporters.gguf.families`,
`exporters.onnx.families`, `exporters.mlx.families`): a spec class per family, registered by the adapter's
``name``; a family without one gets its nearest registered ancestor's (an adapter subclassing another), else
the base."""

from __future__ import annotations

from typing import Generic, TypeVar

from gatenorm.architectures import Architecture
from gatenorm.errors import GatenormError

S = TypeVar("S")


class FamilySpecs(Generic[S]):
    """The spec classes of one format (`fmt`, for messages), each built with the adapter it describes."""

    def __init__(self, fmt: str, base: type[S]):
        self.fmt, self.base, self.specs = fmt, base, {}

    def register(self, *families: str):
        """Class decorator: the spec of each family named (an adapter's ``name``)."""

        def wrap(cls: type[S]) -> type[S]:
            for family in families:
                if family in self.specs:
                    raise GatenormError(f"{self.fmt} spec of {family!r} registered twice")
                self.specs[family] = cls
            return cls

        return wrap

    def unregister(self, family: str) -> None:
        """Remove the spec registered for `family` (a test's dummy)."""
        self.specs.pop(family, None)

    def spec(self, arch: type[Architecture]) -> S:
        """The spec of `arch`: its family's, else its nearest ancestor's, else the base."""
        for cls in arch.__mro__:
            spec = self.specs.get(cls.__dict__.get("name"))
            if spec is not None:
                return spec(arch)
        return self.base(arch)
