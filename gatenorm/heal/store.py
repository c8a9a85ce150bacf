"""The weights of a healed plan's repairs: one safetensors file beside the plan, checked against the plan.

Keys are ``blk.{layer}.weight`` (``d_out x d_in``, float32) and ``blk.{layer}.bias`` for a fitted map,
``blk.{layer}.ffn_down`` (``d_model x d_ff``) for a refitted down projection; each layer's `Repair.sha256`
is the sha256 of its weight's float32 bytes followed by its bias's (C order, little endian), a `Refit`'s
that of its weight, so a plan names exactly the repair it was made with and a changed or swapped file is
refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from gatenorm.errors import GatenormError
from gatenorm.io import atomic_path
from gatenorm.plan import HEALED_SCHEMA_VERSION, PLAN_SCHEMA_VERSION, Healing, Plan, Refit, Repair

#: the suffix of a plan's weights file (``plan.json`` -> ``plan.repairs.safetensors``)
WEIGHTS_SUFFIX = ".repairs.safetensors"


@dataclass(frozen=True)
class LinearRepair:
    """One layer's fitted map ``W @ x + b`` (float32, HF layout: rows are outputs)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def sha256(self) -> str:
        digest = hashlib.sha256(_le_bytes(self.weight))
        if self.bias is not None:
            digest.update(_le_bytes(self.bias))
        return digest.hexdigest()

    def record(self) -> Repair:
        """The plan's record of this repair."""
        out, inp = self.weight.shape
        return Repair(shape=(int(out), int(inp)), bias=self.bias is not None, sha256=self.sha256())


def refit_record(weight: torch.Tensor) -> Refit:
    """The plan's record of a refitted down projection `weight`."""
    out, inp = weight.shape
    return Refit(shape=(int(out), int(inp)), sha256=LinearRepair(weight).sha256())


def _le_bytes(t: torch.Tensor) -> memoryview:
    """`t`'s float32 bytes, little endian, C order (no copy of a contiguous float32 tensor here)."""
    values = t.detach().to(torch.float32).contiguous().numpy()
    if values.dtype.byteorder == ">" or (values.dtype.byteorder == "=" and sys.byteorder == "big"):
        values = values.astype("<f4")
    return memoryview(values).cast("B")


def weights_path_for(plan_path: Path) -> Path:
    """Where the weights of the plan written to `plan_path` go."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name.removesuffix(".json") + WEIGHTS_SUFFIX)


def save_repairs(
    path: Path, repairs: dict[int, LinearRepair], refits: Mapping[int, torch.Tensor] | None = None
) -> None:
    """Write `repairs` (layer -> fitted map) and `refits` (layer -> down projection weight; read one at a
    time, e.g. from `gatenorm.heal.spill.SpilledTensors`) to the safetensors file `path`, atomically."""
    tensors: dict[str, Callable[[], torch.Tensor]] = {}
    for layer, repair in sorted(repairs.items()):
        tensors[f"blk.{layer}.weight"] = lambda repair=repair: repair.weight
        if repair.bias is not None:
            tensors[f"blk.{layer}.bias"] = lambda repair=repair: repair.bias
    for layer in sorted(refits or {}):
        tensors[f"blk.{layer}.ffn_down"] = lambda layer=layer: refits[layer]
    with atomic_path(Path(path)) as tmp:
        _write_float32_safetensors(tmp, tensors, {"format": "pt", "gatenorm": "repairs"})


def _write_float32_safetensors(
    path: Path, tensors: dict[str, Callable[[], torch.Tensor]], metadata: dict
) -> None:
    """A safetensors file of the float32 tensors `tensors` give, one held at a time (safetensors' own
    writer holds a bytes copy of every tensor at once: 2 GB for eight refitted 8B down projections)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, get in tensors.items():
        shape = list(get().shape)
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for get in tensors.values():
            f.write(_le_bytes(get()))


def healed(
    plan: Plan,
    repairs: dict[int, LinearRepair],
    healing: Healing,
    refits: Mapping[int, torch.Tensor] | None = None,
) -> Plan:
    """`plan` with `repairs` and `refits` recorded on their layers and `healing` (whose weights file holds
    them)."""
    unknown = sorted(set(repairs) - set(plan.changed))
    if unknown:
        raise GatenormError(f"repairs for layers {unknown}, which the plan keeps")
    doc = plan.model_dump(mode="json")
    for layer, repair in repairs.items():
        doc["layers"][layer]["repair"] = repair.record().model_dump(mode="json")
    for layer, weight in (refits or {}).items():
        doc["layers"][layer]["refit"] = refit_record(weight).model_dump(mode="json")
    doc.update(schema_version=HEALED_SCHEMA_VERSION, healing=healing.model_dump(mode="json"))
    return Plan.model_validate(doc)


def unhealed(plan: Plan) -> Plan:
    """`plan` without its repairs (nor a recovery trained on them): the same layers and actions."""
    doc = plan.model_dump(mode="json")
    for lp in doc["layers"]:
        lp["repair"] = lp["refit"] = None
    doc.update(healing=None, recovery=None, schema_version=PLAN_SCHEMA_VERSION)
    return Plan.model_validate(doc)


def load_repairs(plan: Plan) -> dict[int, LinearRepair]:
    """Layer -> fitted map of a healed plan, read from its weights file and checked against the plan's shapes
    and hashes (one line naming the file and the layer when anything differs); {} for an unhealed plan."""
    return _load(plan, refits=False)


def load_refits(plan: Plan) -> dict[int, torch.Tensor]:
    """Layer -> refitted down projection weight of a healed plan, checked like `load_repairs`."""
    return _load(plan, refits=True)


def check_weights(plan: Plan) -> None:
    """Refuse (one line naming the file and the layer) a healed plan whose weights file does not hold its
    repairs and refits as recorded, before an exporter writes anything."""
    load_repairs(plan)
    load_refits(plan)


def _load(plan: Plan, refits: bool) -> dict:
    if plan.healing is None:
        return {}
    from safetensors import SafetensorError, safe_open

    path = Path(plan.healing.weights)
    if not path.is_file():
        raise GatenormError(f"the plan's repair weights are missing: no such file {path}")
    what = "refitted down projection" if refits else "repair"
    found = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            for lp in plan.layers:
                record = lp.refit if refits else lp.repair
                if record is None:
                    continue
                key = f"blk.{lp.layer}.{'ffn_down' if refits else 'weight'}"
                if key not in names:
                    raise GatenormError(f"{path}: no {what} weights for layer {lp.layer} ({key})")
                weight = f.get_tensor(key)
                bias = f.get_tensor(f"blk.{lp.layer}.bias") if not refits and lp.repair.bias else None
                repair = LinearRepair(weight, bias)
                if tuple(weight.shape) != tuple(record.shape) or weight.dtype != torch.float32:
                    raise GatenormError(
                        f"{path}: layer {lp.layer}'s {what} is {tuple(weight.shape)} {weight.dtype}, "
                        f"the plan says {tuple(record.shape)} float32"
                    )
                if repair.sha256() != record.sha256:
                    raise GatenormError(
                        f"{path}: layer {lp.layer}'s {what} weights do not match the plan's hash "
                        "(file changed?)"
                    )
                found[lp.layer] = weight if refits else repair
    except (SafetensorError, OSError, RuntimeError) as e:
        raise GatenormError(f"{path}: not a readable repair weights file ({e})") from None
    return found
