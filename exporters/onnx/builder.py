"""The ONNX graph of a pruned model, written node by node from its weights, one decoder layer at a time.

No model is loaded and nothing is traced: `gatenorm.sequential.SequentialModel` holds the transformers
model of the checkpoint's config on the meta device (its structure: scales, windows, rotary modules) and
gives each decoder layer its weights through the checkpoint reader, as the plan's module for that layer
(`gatenorm.apply.planned_layer`: kept, without attention, linearized, removed, or its healed repair; a
refitted down projection). The builder emits that module's nodes, writes its weights in the export's
precision to the external-data file and frees them before the next layer; the embedding, final norm and
LM head come last, vocabulary tables in chunks of rows.

The graph is onnxruntime-genai's: per kept layer one q/k/v MatMul, one ``com.microsoft::GroupQueryAttention``
that applies the rotary embedding itself (``do_rotary``; ``RotaryEmbedding`` nodes first for head or rotary
sizes it does not take, none for layers without rotary) and appends to the layer's cache, and each residual
Add fused into the next RMSNorm (``SkipSimplifiedLayerNormalization``). A linearized or healed layer is one
``d x d`` MatMul (HARP's ``alpha W_o W_v`` or the fitted map) after its input norm. The family's pieces
(q/k norms, soft-capping, sliding window, partial rotary, LongRoPE tables, multipliers, biases) come from its
adapter (`gatenorm.architectures`) and ONNX spec (`exporters.onnx.families`).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from exporters.onnx.families import OnnxFamily, onnx_family
from exporters.onnx.weights import ExternalData, quantize_int4
from gatenorm.architectures.layers import (
    AttentionFreeLayer,
    IdentityLayer,
    LinearAttentionLayer,
    LinearBlockLayer,
)
from gatenorm.errors import GatenormError
from gatenorm.plan import LayerAction, Plan
from gatenorm.sequential import SequentialModel
from gatenorm.sequential.weights import materialize, release

#: ONNX opset of the graph (ORT Mobile and MatMulNBits both support it); int4 graphs: `INT4_OPSET`.
OPSET = 17
#: Opset of int4 exports (as onnxruntime's int4 quantizer writes them).
INT4_OPSET = 21
MS = "com.microsoft"
#: Float32 bytes of a vocabulary table read per chunk.
CHUNK_BYTES = 1 << 26


def past_name(slot: int, part: str) -> str:
    """Graph input holding the cached `part` ("key" or "value") of cache `slot` (0..K-1 over kept layers).

    Slots, not original layer numbers, so that clients that build the names ``0..num_hidden_layers-1``
    from config.json (transformers.js, optimum, older onnxruntime-genai) find every one.
    """
    return f"past_key_values.{slot}.{part}"


def present_name(slot: int, part: str) -> str:
    """Graph output holding the updated cache of cache `slot`."""
    return f"present.{slot}.{part}"


def rms_gain(norm: nn.Module, norm_plus_one: bool) -> tuple[torch.Tensor, float]:
    """(gain, eps) of a transformers RMSNorm ``gain * x / rms(x)``: the llama form (``weight``,
    ``variance_epsilon``) or, for families storing ``w`` for ``1 + w`` (Gemma), ``1 + weight`` (``eps``)."""
    if hasattr(norm, "variance_epsilon"):
        return norm.weight.detach(), float(norm.variance_epsilon)
    if norm_plus_one and hasattr(norm, "eps"):
        return norm.weight.detach().float() + 1, float(norm.eps)
    raise GatenormError(f"{type(norm).__name__} is not an RMSNorm the ONNX builder knows")


def rope_tables(model: nn.Module, rotary: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, rotary_dim/2] from one of the model's rotary modules (scaling included).

    LongRoPE (Phi-3.5, Phi-4-mini) switches factors by sequence length: positions below
    ``original_max_position_embeddings`` get the short factors transformers uses for such sequences,
    later ones the long factors.
    """
    config = model.config
    end = config.max_position_embeddings
    bounds = [0, end]
    original = getattr(config, "original_max_position_embeddings", None)
    if getattr(rotary, "rope_type", None) == "longrope" and original and original < end:
        bounds = [0, original, end]
    probe = torch.zeros(1, dtype=torch.float32)
    parts = []
    with torch.no_grad():
        for start, stop in itertools.pairwise(bounds):
            parts.append(rotary(probe, torch.arange(start, stop)[None]))
    cos, sin = (torch.cat([part[i] for part in parts], dim=1) for i in (0, 1))
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().numpy().copy(), sin[0, :, :half].float().numpy().copy()


class GraphBuilder:
    """Nodes and initializers of one graph; weights go to `data` as they are added (see module doc)."""

    def __init__(self, data: ExternalData, precision: str, block_size: int):
        self.data, self.precision, self.block_size = data, precision, block_size
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.residual: str | None = None  # the residual stream as last materialized
        self.pending: tuple[str, str] | None = None  # (update, scope) still to be added to it

    # ---- primitives

    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1, **attrs) -> list[str]:
        """Add node `name` (its outputs ``{name}/output_{k}`` unless given) and return its outputs."""
        domain = attrs.pop("domain", "")
        names = outputs if isinstance(outputs, list) else [f"{name}/output_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=name, domain=domain, **attrs))
        return names

    def op(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        return self.node(op, inputs, name, **attrs)[0]

    def weight(self, name: str, array: np.ndarray) -> str:
        """A weight initializer, written to the data file now."""
        self.initializers.append(self.data.tensor(name, array))
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        """A small constant held in the graph itself (shapes, scalars)."""
        self.initializers.append(onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def linear(self, scope: str, x: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> str:
        """``x @ weight.T + bias`` (`weight` [out, in], HF layout) in the export's precision."""
        w = weight.detach().float().numpy()
        if self.precision == "int4":
            packed, scales = quantize_int4(w, self.block_size)
            b = self.weight(f"{scope}.weight_Q4", packed)
            y = self.matmul_nbits(scope, x, b, self.weight(f"{scope}.weight_scales", scales), *w.shape)
        else:
            y = self.op(
                "MatMul", [x, self.weight(f"{scope}.weight", np.ascontiguousarray(w.T))], f"{scope}/MatMul"
            )
        if bias is not None:
            y = self.op(
                "Add", [y, self.weight(f"{scope}.bias", bias.detach().float().numpy())], f"{scope}/Add"
            )
        return y

    def matmul_nbits(self, scope: str, x: str, b: str, scales: str, n: int, k: int) -> str:
        """``x @ W.T`` for the int4 weight W [n, k] stored as MatMulNBits' `b` and `scales`."""
        return self.op(
            "MatMulNBits",
            [x, b, scales],
            f"{scope}/MatMul_Q4",
            domain=MS,
            K=k,
            N=n,
            bits=4,
            block_size=self.block_size,
            accuracy_level=4,
        )

    def rms_norm(self, scope: str, x: str, gain: torch.Tensor, eps: float) -> str:
        """``gain * x / rms(x)`` over the last axis of `x`."""
        g = self.weight(f"{scope}.weight", gain.detach().float().numpy())
        return self.op(
            "SimplifiedLayerNormalization",
            [x, g],
            f"{scope}/SimplifiedLayerNormalization",
            axis=-1,
            epsilon=eps,
            stash_type=1,
        )

    # ---- the residual stream

    def hidden(self) -> str:
        """The residual stream with any pending update added."""
        if self.pending is not None:
            update, scope = self.pending
            self.residual = self.op("Add", [self.residual, update], f"{scope}/Add")
            self.pending = None
        return self.residual

    def add(self, update: str, scope: str) -> None:
        """Add `update` to the residual stream (fused into the next norm where one follows)."""
        self.hidden()
        self.pending = (update, scope)

    def normed(self, scope: str, gain: torch.Tensor, eps: float) -> str:
        """The residual stream, its pending update added, RMS-normed (one ``SkipSimplifiedLayerNormalization``
        doing both, whose sum output carries the stream on)."""
        if self.pending is None:
            return self.rms_norm(scope, self.residual, gain, eps)
        update, _ = self.pending
        g = self.weight(f"{scope}.weight", gain.detach().float().numpy())
        name = f"{scope}/SkipSimplifiedLayerNormalization"
        out = [f"{name}/output_0", "", "", f"{name}/output_3"]
        self.node(
            "SkipSimplifiedLayerNormalization", [self.residual, update, g], name, out, domain=MS, epsilon=eps
        )
        self.residual, self.pending = out[3], None
        return out[0]


class ModelBuilder:
    """Writes one pruned model's graph (see the module doc); `build` returns the weightless ModelProto."""

    def __init__(self, seq: SequentialModel, plan: Plan, precision: str, block_size: int, data: ExternalData):
        self.seq, self.plan = seq, plan
        self.arch = seq.arch
        self.spec: OnnxFamily = onnx_family(self.arch)
        self.config = seq.config
        self.g = GraphBuilder(data, precision, block_size)
        self.precision = precision
        self.heads, self.kv_heads = self.config.num_attention_heads, self.config.num_key_value_heads
        self.tables: dict[int, tuple[str, str] | None] = {}
        self.slot = 0

    def _norm(self, module: nn.Module) -> tuple[torch.Tensor, float]:
        return rms_gain(module, self.arch.norm_plus_one)

    # ---- graph inputs shared by every layer

    def _inputs(self) -> None:
        g = self.g
        mask_sum = g.op(
            "ReduceSum",
            ["attention_mask", g.const("/model/attn_mask_reformat/axes", np.array([1]))],
            "/model/attn_mask_reformat/ReduceSum",
            keepdims=0,
        )
        one = g.const("/model/attn_mask_reformat/one", np.array(1, np.int64))
        seqlens = g.op("Sub", [mask_sum, one], "/model/attn_mask_reformat/Sub")
        self.seqlens_k = g.op("Cast", [seqlens], "/model/attn_mask_reformat/Cast", to=TensorProto.INT32)
        shape = g.op("Shape", ["attention_mask"], "/model/attn_mask_reformat/Shape")
        index = g.const("/model/attn_mask_reformat/index", np.array(1, np.int64))
        total = g.op("Gather", [shape, index], "/model/attn_mask_reformat/Gather", axis=0)
        self.total = g.op("Cast", [total], "/model/attn_mask_reformat/CastTotal", to=TensorProto.INT32)

    def _rope(self, attention: nn.Module) -> tuple[str, str] | None:
        """The cos/sin tables of `attention`'s rotary module (None: a layer without rotary)."""
        rotary = self.arch.rotary_module(self.seq.skeleton, attention)
        if rotary is None:
            return None
        if id(rotary) not in self.tables:
            cos, sin = rope_tables(self.seq.skeleton, rotary)
            suffix = "" if not self.tables else f"_{len(self.tables)}"
            self.tables[id(rotary)] = (
                self.g.weight(f"cos_cache{suffix}", cos),
                self.g.weight(f"sin_cache{suffix}", sin),
            )
        return self.tables[id(rotary)]

    # ---- layers

    def _attention(self, i: int, layer: nn.Module) -> None:
        """A kept attention sublayer: norm, packed q/k/v, q/k norms, rotary, GroupQueryAttention, output."""
        g, arch, spec = self.g, self.arch, self.spec
        parts = arch.layer_parts(layer)
        attention = parts.attention
        scope = f"/model/layers.{i}/{arch.hf_attention_module}"
        if parts.attention_norm is not None:
            x = g.normed(f"/model/layers.{i}/{arch.hf_attention_norm}", *self._norm(parts.attention_norm))
        else:
            x = g.hidden()
        head_dim = attention.head_dim
        packed = spec.qkv_projection(attention)
        q = g.linear(f"{scope}/qkv_proj", x, packed.weight, packed.bias)
        k = v = ""
        tables = self._rope(attention)
        rotary_dim = 0 if tables is None else 2 * int(self._table_width(tables))
        in_attention = tables is not None and head_dim % 16 == 0 and rotary_dim % 16 == 0
        norms = spec.qk_norms(attention)
        if norms is not None or (tables is not None and not in_attention):
            sizes = g.const(
                f"{scope}/split_sizes",
                np.array(
                    [self.heads * head_dim, self.kv_heads * head_dim, self.kv_heads * head_dim], np.int64
                ),
            )
            q, k, v = g.node("Split", [q, sizes], f"{scope}/Split", 3, axis=-1)
            if norms is not None:
                q = self._qk_norm(f"{scope}/q_norm", q, norms[0], head_dim)
                k = self._qk_norm(f"{scope}/k_norm", k, norms[1], head_dim)
            if tables is not None and not in_attention:
                q, k = (
                    g.op(
                        "RotaryEmbedding",
                        [x, "position_ids", *tables],
                        f"{scope}/{name}_rotary/RotaryEmbedding",
                        domain=MS,
                        interleaved=0,
                        num_heads=heads,
                        rotary_embedding_dim=rotary_dim,
                    )
                    for x, name, heads in ((q, "q", self.heads), (k, "k", self.kv_heads))
                )
        window = arch.sliding_window(attention, self.config)
        # as onnxruntime-genai's builder: GroupQueryAttention's own position_ids input stays empty (it
        # rotates at the positions seqlens_k gives: past length + offset in the new tokens)
        rotary = [*tables] if in_attention else []
        slot = self.slot
        self.slot += 1
        name = f"{scope}/GroupQueryAttention"
        out = g.node(
            "GroupQueryAttention",
            [q, k, v, past_name(slot, "key"), past_name(slot, "value"), self.seqlens_k, self.total, *rotary],
            name,
            [f"{name}/output_0", present_name(slot, "key"), present_name(slot, "value")],
            domain=MS,
            num_heads=self.heads,
            kv_num_heads=self.kv_heads,
            scale=float(attention.scaling),
            local_window_size=-1 if window is None else int(window),
            softcap=float(spec.attention_softcap(attention)),
            do_rotary=int(in_attention),
            rotary_interleaved=0,
        )[0]
        o = getattr(attention, arch.hf_output_proj)
        update = g.linear(f"{scope}/{arch.hf_output_proj}", out, o.weight, o.bias)
        self._update(i, "attention", update, parts.post_attention_norm, parts.residual_scale)

    def _table_width(self, tables: tuple[str, str]) -> int:
        init = next(t for t in self.g.initializers if t.name == tables[0])
        return int(init.dims[1])

    def _qk_norm(self, scope: str, x: str, norm: nn.Module, head_dim: int) -> str:
        """A q or k norm: per head (Qwen3, Gemma-3: a gain of head_dim entries) or over the whole
        projection (OLMo-2)."""
        gain, eps = self._norm(norm)
        if gain.numel() != head_dim:
            return self.g.rms_norm(scope, x, gain, eps)
        heads = self.g.const(f"{scope}/heads_shape", np.array([0, 0, -1, head_dim], np.int64))
        flat = self.g.const(f"{scope}/flat_shape", np.array([0, 0, -1], np.int64))
        split = self.g.op("Reshape", [x, heads], f"{scope}/Reshape")
        normed = self.g.rms_norm(scope, split, gain, eps)
        return self.g.op("Reshape", [normed, flat], f"{scope}/ReshapeBack")

    def _update(self, i: int, sublayer: str, update: str, post_norm: nn.Module | None, scale: float) -> None:
        """The output of `sublayer` ("attention", "mlp") joining the residual stream: its post norm
        (Gemma-2/3, OLMo-2), its multiplier (Granite), the (fused) Add."""
        g = self.g
        scope = f"/model/layers.{i}/{sublayer}_residual"
        if post_norm is not None:
            name = self.arch.hf_post_attention_norm if sublayer == "attention" else self.arch.hf_post_mlp_norm
            update = g.rms_norm(f"/model/layers.{i}/{name}", update, *self._norm(post_norm))
        if scale != 1.0:
            factor = g.const(f"{scope}/scale", np.array(scale, np.float32))
            update = g.op("Mul", [update, factor], f"{scope}/Mul")
        g.add(update, scope)

    def _mlp_step(self, i: int, mlp: nn.Module, mlp_norm, post_mlp_norm, scale: float) -> None:
        """``h + s * post(mlp(norm(h)))`` with a gated MLP (one MatMul for gate and up)."""
        g, arch = self.g, self.arch
        scope = f"/model/layers.{i}/{arch.hf_mlp_module}"
        if mlp_norm is not None:
            x = g.normed(f"/model/layers.{i}/{arch.hf_mlp_norm}", *self._norm(mlp_norm))
        else:
            x = g.hidden()
        weight, bias = self.spec.gate_up(mlp)
        both = g.linear(f"{scope}/gate_up_proj", x, weight, bias)
        gate, up = g.node(
            "Split",
            [both, g.const(f"{scope}/split_sizes", np.array([weight.shape[0] // 2] * 2, np.int64))],
            f"{scope}/Split",
            2,
            axis=-1,
        )
        act_fn = mlp.act_fn if hasattr(mlp, "act_fn") else mlp.activation_fn  # Phi-3: activation_fn
        act = self._activation(f"{scope}/act_fn", gate, act_fn)
        hidden = g.op("Mul", [act, up], f"{scope}/Mul")
        down = getattr(mlp, arch.hf_down_proj)
        update = g.linear(f"{scope}/{arch.hf_down_proj}", hidden, down.weight, down.bias)
        self._update(i, "mlp", update, post_mlp_norm, scale)

    def _activation(self, scope: str, x: str, act: nn.Module) -> str:
        name = type(act).__name__
        if isinstance(act, nn.SiLU) or "SiLU" in name:
            return self.g.op("Mul", [x, self.g.op("Sigmoid", [x], f"{scope}/Sigmoid")], f"{scope}/Mul")
        if "Tanh" in name or getattr(act, "approximate", None) == "tanh":
            return self.g.op("FastGelu", [x], f"{scope}/FastGelu", domain=MS)
        if isinstance(act, nn.GELU) or name == "GELUActivation":
            return self.g.op("Gelu", [x], f"{scope}/Gelu", domain=MS)
        raise GatenormError(f"the ONNX builder does not know the activation {name}")

    def _layer(self, i: int, module: nn.Module) -> None:
        """Decoder layer `i` as the plan made it (`module`: `SequentialModel.build`)."""
        if isinstance(module, IdentityLayer):
            return
        if isinstance(module, LinearBlockLayer | LinearAttentionLayer):
            names = module._roles
            norm = module._modules.get(names["attention_norm"])
            scope = f"/model/layers.{i}/{names['attention_norm']}"
            x = self.g.normed(scope, *self._norm(norm)) if norm is not None else self.g.hidden()
            fused = module.fused_attention
            update = self.g.linear(f"/model/layers.{i}/fused_attention", x, fused.weight, fused.bias)
            if isinstance(module, LinearBlockLayer):
                self.g.add(update, f"/model/layers.{i}/block_residual")
                return
            post = module._modules.get(names["post_attention_norm"])
            self._update(i, "attention", update, post, module.residual_scale * module.scale)
        if isinstance(module, AttentionFreeLayer):
            part = module._part
            self._mlp_step(i, part("mlp"), part("mlp_norm"), part("post_mlp_norm"), module.residual_scale)
            return
        self._attention(i, module)
        parts = self.arch.layer_parts(module)
        self._mlp_step(i, parts.mlp, parts.mlp_norm, parts.post_mlp_norm, parts.residual_scale)

    # ---- embedding and head

    def _vocab_name(self, module: nn.Module) -> str:
        return self.seq._prefix[id(module)] + "weight"

    def _row_chunks(self, name: str):
        tensors = self.seq.tensors
        total = tensors.rows(name)
        step = max(CHUNK_BYTES // (4 * self.config.hidden_size), 1)
        for start in range(0, total, step):
            yield tensors.read_rows(name, start, min(start + step, total)).float().numpy()

    def _quantized_table(self, name: str, table: str) -> tuple[str, str, int]:
        """A vocabulary table [V, d] at int4 as MatMulNBits stores an LM head: (B, scales, rows)."""
        rows, d = self.seq.tensors.rows(table), self.config.hidden_size
        blocks = (d + self.g.block_size - 1) // self.g.block_size
        scales = []

        def packed():
            for chunk in self._row_chunks(table):
                b, s = quantize_int4(chunk, self.g.block_size)
                scales.append(s)
                yield b

        shape = (rows, blocks, self.g.block_size // 2)
        self.g.initializers.append(self.g.data.stream(f"{name}.weight_Q4", np.uint8, shape, packed()))
        self.g.weight(f"{name}.weight_scales", np.concatenate(scales))  # [V, blocks]
        return f"{name}.weight_Q4", f"{name}.weight_scales", rows

    def _embedding(self) -> None:
        g = self.g
        embed = self.seq.skeleton.get_input_embeddings()
        table = self._vocab_name(embed)
        head = self.seq.skeleton.get_output_embeddings()
        self.head_table = self._vocab_name(head) if self.seq.tensors.has(self._vocab_name(head)) else table
        d = self.config.hidden_size
        scope = "/model/embed_tokens"
        if self.precision == "int4" and d % g.block_size == 0:
            # the table as MatMulNBits would store it: the tied LM head reads the same tensors
            b, scales, rows = self._quantized_table("model.embed_tokens", table)
            self.quantized_table = (b, scales) if self.head_table == table else None
            data = g.op(
                "Reshape",
                [b, g.const(f"{scope}/table_shape", np.array([rows, d // 2], np.int64))],
                f"{scope}/Reshape",
            )
            x = g.op(
                "GatherBlockQuantized",
                [data, "input_ids", scales],
                f"{scope}/GatherBlockQuantized",
                domain=MS,
                gather_axis=0,
                quantize_axis=1,
                block_size=g.block_size,
                bits=4,
            )
        else:
            self.quantized_table = None
            rows = self.seq.tensors.rows(table)
            g.initializers.append(g.data.stream(table, np.float32, (rows, d), self._row_chunks(table)))
            x = g.op("Gather", [table, "input_ids"], f"{scope}/Gather", axis=0)
        scale = self.spec.embedding_scale(self.config)
        if scale != 1.0:
            x = g.op("Mul", [x, g.const(f"{scope}/scale", np.array(scale, np.float32))], f"{scope}/Mul")
        g.residual = x
        self.embedding_table = table

    def _head(self) -> None:
        g = self.g
        skeleton = self.seq.skeleton
        norm = skeleton.model.norm
        materialize(norm, self.seq._prefix[id(norm)], self.seq.tensors)
        x = g.normed("/model/norm", *self._norm(norm))
        release(norm)
        scope = "/lm_head"
        rows, d = self.seq.tensors.rows(self.head_table), self.config.hidden_size
        if self.precision == "int4":
            if self.quantized_table is not None:
                b, scales = self.quantized_table
            else:
                b, scales, rows = self._quantized_table("lm_head", self.head_table)
            logits = g.matmul_nbits(scope, x, b, scales, rows, d)
        else:
            table = self.head_table
            if table != self.embedding_table:
                g.initializers.append(g.data.stream(table, np.float32, (rows, d), self._row_chunks(table)))
            transposed = g.op("Transpose", [table], f"{scope}/Transpose", perm=[1, 0])
            logits = g.op("MatMul", [x, transposed], f"{scope}/MatMul")
        divisor = self.spec.logits_divisor(self.config)
        if divisor != 1.0:
            logits = g.op(
                "Div", [logits, g.const(f"{scope}/divisor", np.array(divisor, np.float32))], f"{scope}/Div"
            )
        cap = self.spec.logits_softcap(self.config)
        if cap:
            c = g.const(f"{scope}/softcap", np.array(cap, np.float32))
            logits = g.op(
                "Mul",
                [
                    g.op("Tanh", [g.op("Div", [logits, c], f"{scope}/softcap/Div")], f"{scope}/softcap/Tanh"),
                    c,
                ],
                f"{scope}/softcap/Mul",
            )
        g.node("Identity", [logits], f"{scope}/Identity", ["logits"])

    # ---- the whole graph

    def build(self) -> onnx.ModelProto:
        from gatenorm.heal.store import load_refits, load_repairs

        repairs, refits = load_repairs(self.plan), load_refits(self.plan)
        self._inputs()
        self._embedding()
        for lp in self.plan.layers:
            i = lp.layer
            if lp.action is LayerAction.DROP_BLOCK and i not in repairs:
                continue
            module = self.seq.build(i, lp, repairs, refits)
            self._layer(i, module)
            del module
            self.seq.release(i)
        self._head()
        return self._model()

    def _model(self) -> onnx.ModelProto:
        kv, head_dim = self.kv_heads, _head_dim(self.config)
        float_ = TensorProto.FLOAT
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info(
                "attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]
            ),
            helper.make_tensor_value_info(
                "position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]
            ),
        ]
        outputs = [
            helper.make_tensor_value_info(
                "logits", float_, ["batch_size", "sequence_length", self.config.vocab_size]
            )
        ]
        for slot in range(self.slot):
            for part in ("key", "value"):
                inputs.append(
                    helper.make_tensor_value_info(
                        past_name(slot, part), float_, ["batch_size", kv, "past_sequence_length", head_dim]
                    )
                )
                outputs.append(
                    helper.make_tensor_value_info(
                        present_name(slot, part),
                        float_,
                        ["batch_size", kv, "total_sequence_length", head_dim],
                    )
                )
        graph = helper.make_graph(self.g.nodes, "main_graph", inputs, outputs, self.g.initializers)
        opset = INT4_OPSET if self.precision == "int4" else OPSET
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
            producer_name="gatenorm",
        )
        model.ir_version = 10 if opset >= 21 else 8
        return model


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def build_onnx(
    seq: SequentialModel, plan: Plan, path: Path, precision: str, block_size: int
) -> onnx.ModelProto:
    """The graph of `plan` applied to `seq`'s checkpoint, its weights in ``{path.name}_data`` beside
    `path` (written as it goes); returns the weightless ModelProto (save it at `path`)."""
    data = ExternalData(path.with_name(path.name + "_data"))
    try:
        return ModelBuilder(seq, plan, precision, block_size, data).build()
    finally:
        data.close()
