"""Source models of a recipe: resolve each entry to a local file or folder, name it, hash its content."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gatenorm.errors import GatenormError
from gatenorm.io import content_sha256
from gatenorm.models import SHIPPED_MODELS, resolve_model
from gatenorm.recipes.schema import ModelEntry

_HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class ResolvedSource:
    """A source model on this machine: its short name, absolute path and the sha256 of its content."""

    name: str
    path: Path
    sha256: str

    @property
    def is_gguf(self) -> bool:
        return self.path.is_file()


def _download(entry: ModelEntry) -> Path:
    """Fetch a hub repository (or one GGUF file of it) into the Hugging Face cache."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if entry.file:
            return Path(hf_hub_download(entry.hub, entry.file, revision=entry.revision))
        return Path(snapshot_download(entry.hub, revision=entry.revision, allow_patterns=_HF_PATTERNS))
    except Exception as e:  # offline, unknown repository, gated model: one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GatenormError(f"cannot download {entry.hub} from the Hugging Face hub: {first}") from None


def default_name(entry: ModelEntry) -> str:
    """A file-name-safe short name: the given one, the shipped alias, or the file or repository name."""
    if entry.name:
        return entry.name
    if entry.path in SHIPPED_MODELS:
        return entry.path
    base = (entry.file or entry.hub) if entry.hub else entry.path
    stem = Path(base.rstrip("/")).name.removesuffix(".gguf")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"


def resolve_source(entry: ModelEntry) -> ResolvedSource:
    """The local, absolute path of a recipe's model entry (downloading a hub one), named and hashed."""
    path = _download(entry) if entry.hub else resolve_model(entry.path)
    if not path.exists():
        raise GatenormError(f"no such model file or folder: {entry.path}")
    path = path.resolve()
    return ResolvedSource(default_name(entry), path, content_sha256(path))
