"""Checkpoint readers: open a GGUF file or an HF safetensors folder and read attention tensors lazily."""

from __future__ import annotations

from pathlib import Path

from gatenorm.errors import GatenormError
from gatenorm.readers.base import AttentionWeights, Checkpoint, ContentHash, ModelShape
from gatenorm.readers.gguf_file import GGUFCheckpoint, is_gguf
from gatenorm.readers.hf_folder import HFCheckpoint

__all__ = ["AttentionWeights", "Checkpoint", "ContentHash", "ModelShape", "open_checkpoint"]


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open `path` (a GGUF file, an HF folder, or a .safetensors file inside one) without loading weights."""
    path = Path(path)
    if not path.exists():
        raise GatenormError(f"no such file or folder: {path}")
    if path.is_dir():
        return HFCheckpoint(path)
    if path.suffix == ".safetensors":
        return HFCheckpoint(path.parent)
    if path.suffix == ".gguf" or is_gguf(path):
        return GGUFCheckpoint(path)
    raise GatenormError(f"unrecognized model format: {path} (expected a .gguf file or an HF model folder)")
