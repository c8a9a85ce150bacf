"""The merged tensors of a recovered plan: one safetensors file beside the plan, checked against the plan.

Keys are state-dict names (``model.layers.9.self_attn.o_proj.weight``), values float32 in HF layout; the
plan's `Recovery.tensors` records each one's sha256 (`gatenorm.heal.store.LinearRepair.sha256`), so a
changed or swapped file is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gatenorm.errors import GatenormError
from gatenorm.heal.store import LinearRepair
from gatenorm.io import _umask, atomic_path
from gatenorm.plan import Plan, Recovery

#: the suffix of a plan's merged tensors file (``plan.json`` -> ``plan.recovered.safetensors``)
WEIGHTS_SUFFIX = ".recovered.safetensors"


def weights_path_for(plan_path: Path) -> Path:
    """Where the merged tensors of the plan written to `plan_path` go."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name.removesuffix(".json") + WEIGHTS_SUFFIX)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """The sha256 of `tensor`'s float32 bytes (C order, little endian)."""
    return LinearRepair(tensor).sha256()


def save_overrides(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` (state-dict name -> merged weight) to the safetensors file `path`, atomically."""
    from safetensors.torch import save_file

    data = {name: t.detach().to(torch.float32).contiguous() for name, t in sorted(tensors.items())}
    with atomic_path(Path(path)) as tmp:
        save_file(data, str(tmp), metadata={"format": "pt", "gatenorm": "recovered"})
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes a new, private file: a normal file's mode


def recovered(plan: Plan, recovery: Recovery) -> Plan:
    """`plan` with `recovery` recorded (its weights file holding the merged tensors)."""
    if plan.recovery is not None:
        raise GatenormError("the plan is already recovered")
    return plan.model_copy(update={"recovery": recovery})


def load_overrides(plan: Plan | None) -> dict[str, torch.Tensor]:
    """State-dict name -> merged tensor (float32) of a recovered plan, read from its weights file and
    checked against the plan's hashes (one line naming the file and the tensor when anything differs); {}
    for a plan without recovery. The one place every consumer reads a recovery's weights from."""
    if plan is None or plan.recovery is None:
        return {}
    from safetensors import SafetensorError, safe_open

    path = Path(plan.recovery.weights)
    if not path.is_file():
        raise GatenormError(f"the plan's recovered weights are missing: no such file {path}")
    found = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            for name, digest in plan.recovery.tensors.items():
                if name not in names:
                    raise GatenormError(f"{path}: no recovered tensor {name}")
                tensor = f.get_tensor(name)
                if tensor.dtype != torch.float32 or tensor_sha256(tensor) != digest:
                    raise GatenormError(f"{path}: {name} does not match the plan's hash (file changed?)")
                found[name] = tensor
    except (SafetensorError, OSError, RuntimeError) as e:
        raise GatenormError(f"{path}: not a readable recovered weights file ({e})") from None
    return found
