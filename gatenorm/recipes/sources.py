"""Source models of a recipe: resolve each entry to a local file or folder, name it, hash its content."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gatenorm.errors import GatenormError
from gatenorm.hub import HubId, fetch, parse_hub_id
from gatenorm.io import content_sha256
from gatenorm.models import SHIPPED_MODELS, LocatedModel, locate_model
from gatenorm.plan import HubSource
from gatenorm.recipes.schema import ModelEntry


@dataclass(frozen=True)
class ResolvedSource:
    """A source model on this machine: its short name, absolute path and the sha256 of its content (and,
    fetched from the hub, where from: what its plans record)."""

    name: str
    path: Path
    sha256: str
    hub: HubSource | None = None

    @property
    def is_gguf(self) -> bool:
        return self.path.is_file()


def default_name(entry: ModelEntry) -> str:
    """A file-name-safe short name: the given one, the shipped alias, or the file or repository name."""
    if entry.name:
        return entry.name
    if entry.path in SHIPPED_MODELS:
        return entry.path
    hub = HubId(entry.hub, entry.revision, entry.file) if entry.hub else None
    if hub is None and not Path(entry.path).exists():
        hub = parse_hub_id(entry.path)
    base = (hub.file or hub.repo) if hub is not None else entry.path
    stem = Path(base.rstrip("/")).name.removesuffix(".gguf")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"


def resolve_source(entry: ModelEntry) -> ResolvedSource:
    """The local, absolute path of a recipe's model entry (a path, shipped alias or hub id as the command
    line takes them, or a `hub:` entry; hub models fetched), named and hashed."""
    if entry.hub:
        hub = fetch(HubId(entry.hub, entry.revision, entry.file))
        located = LocatedModel(hub.path, hub)
    else:
        located = locate_model(entry.path)
    if not located.path.exists():
        raise GatenormError(f"no such model file or folder: {entry.path}")
    path = located.path.resolve()
    return ResolvedSource(default_name(entry), path, content_sha256(path), located.provenance)
