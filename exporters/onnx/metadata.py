"""What an exported ONNX folder says about itself: model metadata_props and ``gatenorm_onnx.json``."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from pydantic import BaseModel, ConfigDict, ValidationError

from exporters.keys import LISTS, Keys, canonical, plan_values
from exporters.onnx.builder import past_name, present_name
from gatenorm import __version__
from gatenorm.errors import GatenormError
from gatenorm.plan import LayerAction, Plan

CONFIG_NAME = "gatenorm_onnx.json"


class KVLayer(BaseModel):
    """The cache tensors of one kept layer: `layer` is its original index, the names carry its cache slot
    (its position in ``kv_cache``; folders written before gatenorm named them by `layer`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: int
    past_key: str
    past_value: str
    present_key: str
    present_value: str


class OnnxExportConfig(BaseModel):
    """The JSON written next to the model: files, shapes and the kept layers' KV names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = "gatenorm-onnx"
    tool_version: str = __version__
    model: str  # relative to the folder: onnx/model.onnx (model.onnx in folders of older versions)
    ort_model: str | None = None
    required_operators: str | None = None
    precision: str
    int4_block_size: int | None = None
    architecture: str
    n_layers: int
    dropped_layers: list[int]
    linearized_layers: list[int] = []
    linearize_alphas: list[float] = []
    dropped_blocks: list[int] = []
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    eos_token_id: list[int]
    kv_cache: list[KVLayer]
    tokenizer: bool

    @classmethod
    def load(cls, folder: Path) -> OnnxExportConfig:
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise GatenormError(f"{folder} is not a gatenorm ONNX export (no {CONFIG_NAME})")
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as e:
            raise GatenormError(f"{path}: invalid: {e.errors()[0]['msg']}") from None


def kv_layers(plan: Plan) -> list[KVLayer]:
    """The KV-cache names of every layer the plan keeps, in cache-slot order (slot s: names ``*.{s}.*``)."""
    kept = [lp.layer for lp in plan.layers if lp.action is LayerAction.KEEP]
    return [
        KVLayer(
            layer=layer,
            past_key=past_name(slot, "key"),
            past_value=past_name(slot, "value"),
            present_key=present_name(slot, "key"),
            present_value=present_name(slot, "value"),
        )
        for slot, layer in enumerate(kept)
    ]


def plan_metadata(plan: Plan, precision: str, changed_tensors: list[str] | None = None) -> dict[str, str]:
    """The ``metadata_props`` of an export: the plan keys every format writes (`exporters.keys`; lists as
    JSON; `changed_tensors`: `fused_initializers`), the cache slots' original layers and the precision."""
    values = plan_values(plan, changed_tensors) | {Keys.KV_LAYERS: plan.kv_layers, Keys.PRECISION: precision}
    return {key: json.dumps(v) if isinstance(v, list) else str(v) for key, v in values.items()}


def fused_initializers(model: onnx.ModelProto, plan: Plan) -> list[str]:
    """The initializers of the linearized and repaired layers' fused matmul (``fused_attention``: HARP's
    ``alpha W_o W_v`` or a fitted repair, and its bias) and of the refitted down projections, the tensors
    whose values gatenorm computed."""
    from gatenorm.architectures import get_architecture

    arch = get_architecture(plan.source.architecture)
    scopes = tuple(f"/model/layers.{i}/fused_attention/" for i in sorted({*plan.linearized, *plan.repaired}))
    scopes += tuple(f"/model/layers.{i}/{arch.hf_mlp_module}/{arch.hf_down_proj}/" for i in plan.refitted)
    if not scopes:
        return []
    inits = {i.name for i in model.graph.initializer}
    used = {x for n in model.graph.node if n.name.startswith(scopes) for x in n.input if x in inits}
    return sorted(used)


def read_metadata(props: dict[str, str]) -> dict[str, object]:
    """The ``gatenorm.*`` props of a model, lists decoded, under today's names (older folders included)."""
    found = {key: value for key, value in props.items() if key.startswith(Keys.PREFIX)}
    lists = {*LISTS, Keys.SCORES, Keys.KV_LAYERS}
    return {key: json.loads(v) if key in lists else v for key, v in canonical(found).items()}


def set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Replace `model`'s metadata_props entries named in `props`, keeping the others."""
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **props})


def plan_from_metadata(props: dict[str, str]) -> Plan:
    """The plan stored in a model's metadata (``InferenceSession.get_modelmeta().custom_metadata_map``)."""
    text = props.get(Keys.PLAN)
    if text is None:
        raise GatenormError("the model carries no gatenorm plan in its metadata")
    return Plan.from_json(text)
