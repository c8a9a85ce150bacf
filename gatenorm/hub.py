"""Hugging Face hub ids as model names: ``org/name[@revision]`` (a safetensors folder) or
``org/name[@revision]:FILE.gguf`` (one GGUF file of a repository), fetched into huggingface_hub's cache.

huggingface_hub does the work and reads its own settings: ``HF_HOME`` / ``HF_HUB_CACHE`` (where the cache
lies), ``HF_HUB_OFFLINE`` (cache only) and ``HF_TOKEN`` (gated and private repositories).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from gatenorm.errors import GatenormError

#: the files of a transformers model folder that gatenorm reads (weights, config, tokenizer, chat template)
HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]

_HUB_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^:@\s]+))?(?::(?P<file>\S+\.gguf))?"
)


@dataclass(frozen=True)
class HubId:
    """A hub repository, a revision of it (None: the default branch) and a GGUF file in it (None: the
    safetensors folder)."""

    repo: str
    revision: str | None = None
    file: str | None = None

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"{self.repo}{at}:{self.file}" if self.file else f"{self.repo}{at}"


@dataclass(frozen=True)
class HubModel:
    """Where a hub id was fetched to, and the commit that the cache holds for it."""

    id: HubId
    path: Path
    commit: str


def parse_hub_id(spec: str) -> HubId | None:
    """The hub id that `spec` spells, or None (a path: ``x.gguf``, ``./a/b``, three parts...)."""
    match = _HUB_ID.fullmatch(spec)
    if match is None or (match["file"] is None and spec.endswith((".gguf", ".safetensors"))):
        return None
    return HubId(match["repo"], match["revision"], match["file"])


def _commit_of(path: Path) -> str:
    """The commit a cached path belongs to (``.../snapshots/<commit>/...``)."""
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else ""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _one_line(hub: HubId, error: Exception) -> GatenormError:
    """huggingface_hub's exception as one line naming the repository, file or revision at fault."""
    from huggingface_hub import errors

    what = f"{hub.repo}" + (f" ({hub.file})" if hub.file else "")
    if isinstance(error, errors.GatedRepoError):
        return GatenormError(f"{hub.repo} is gated on the Hugging Face hub: accept its terms, set HF_TOKEN")
    if isinstance(error, errors.RepositoryNotFoundError):
        return GatenormError(
            f"no such repository on the Hugging Face hub (or private: set HF_TOKEN): {hub.repo}"
        )
    if isinstance(error, errors.RevisionNotFoundError):
        return GatenormError(f"{hub.repo} has no revision {hub.revision!r} on the Hugging Face hub")
    if isinstance(error, errors.LocalEntryNotFoundError) or _offline():
        return GatenormError(
            f"{what} is not in the Hugging Face cache"
            + (" and HF_HUB_OFFLINE is set" if _offline() else " and the hub cannot be reached")
        )
    if isinstance(error, errors.EntryNotFoundError):
        return GatenormError(f"{hub.repo} has no file {hub.file} on the Hugging Face hub")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return GatenormError(f"cannot fetch {what} from the Hugging Face hub: {first}")


def fetch(hub: HubId) -> HubModel:
    """Fetch `hub` into huggingface_hub's cache (or find it there): its GGUF file, or its model folder."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if hub.file:
            path = Path(hf_hub_download(hub.repo, hub.file, revision=hub.revision))
        else:
            path = Path(snapshot_download(hub.repo, revision=hub.revision, allow_patterns=HF_PATTERNS))
    except Exception as e:  # offline, unknown repository or file, gated model: one line for the user
        raise _one_line(hub, e) from None
    if not hub.file and not (path / "config.json").is_file():
        raise GatenormError(
            f"{hub.repo} holds no transformers model (no config.json); for a GGUF of it name the file: "
            f"{hub.repo}:FILE.gguf"
        )
    return HubModel(hub, path, _commit_of(path))
