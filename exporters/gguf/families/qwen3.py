"""Qwen3 (dense) in GGUF: unchanged and drop-block as ``qwen3``; plans dropping attention as llama.cpp's
``qwen35`` (dense Qwen3.5, ``src/models/qwen35.cpp``), which hosts them exactly (checked on llama.cpp's
logits):

- a kept layer is a qwen35 attention layer: Qwen3's q/k norms and NEOX rope, plus an output gate
  ``sigmoid(gate rows of attn_q)``: the gate rows are written as zeros with a bias of 30, and
  sigmoid(30) is 1.0 in float32, so ``attn_output`` stays byte for byte; the rope is IMROPE, which for text
  (positions (p, p, p, 0)) equals NEOX when ``rope.dimension_sections`` is (1, 1, 1, 0): every rotary pair
  then takes p (none the fourth, 0);
- a dropped attention is a recurrent (gated delta net) layer with all-zero weights, listed in
  ``attention.recurrent_layers``: its output projection is zero, so it adds exactly 0, and it has no KV
  cache (a 32 x 32 state per sequence instead, 32 being the smallest size Metal runs);
- Qwen3's ``ffn_norm`` is qwen35's ``post_attention_norm``.

``linearize`` has no qwen35 form: the recurrent layer passes v through a SiLU after its convolution and
RMS-normalises its output, so HARP's linear map ``alpha * W_o W_v norm(h)`` is not expressible.
"""

from __future__ import annotations

import gguf
import numpy as np

from exporters.gguf.families.base import MT, GgufFamily, V, register_gguf_family
from exporters.gguf.host_layout import HostLayout, HostTensor
from gatenorm.architectures import gguf_tensor
from gatenorm.errors import GatenormError

HOST = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN35]
#: sigmoid(GATE_OPEN) == 1.0 in float32 (1 + exp(-30) rounds to 1)
GATE_OPEN = 30.0
#: the all-zero recurrent layer: conv kernel, state (head) size, key groups, value heads
SSM_KERNEL, SSM_STATE, SSM_GROUPS, SSM_V_HEADS = 4, 32, 1, 1


def _name(tensor: gguf.MODEL_TENSOR, i: int, suffix: str = "weight") -> str:
    return gguf_tensor(tensor, suffix).format(i=i)


@register_gguf_family("qwen3")
class Qwen3Gguf(GgufFamily):
    """Qwen3: drop-block as ``qwen3``, drop-attention (with drop-block) as ``qwen35``."""

    deci_exportable = False
    deci_refusal = (
        "deci has no per-head q/k norm, and llama.cpp's qwen35 (which hosts drop-attention) has no linear "
        "map for linearize (its recurrent layer applies a SiLU and an RMSNorm)"
    )
    block_removal = True
    host_actions = frozenset({"drop-attention", "drop-block"})
    works = (
        "drop-attention and drop-block plans (as qwen35 / qwen3 GGUFs), or PyTorch / ONNX for every action"
    )

    def host_layout(self, header, plan) -> HostLayout | None:
        """The ``qwen35`` file of a plan that drops attention (None for other plans)."""
        from gatenorm.plan import LayerAction

        if LayerAction.DROP_ATTENTION not in plan.actions:
            return None
        names = {t.name for t in header.tensors}
        d, n_head, head_dim = self.attention_dims(header.fields)
        biases = sorted(n for n in names if n.startswith("blk.") and ".attn_" in n and n.endswith(".bias"))
        if biases:
            raise GatenormError(
                f"cannot export qwen3 with drop-attention to GGUF: llama.cpp's qwen35 has no attention "
                f"output bias and this model has attention biases ({biases[0]}, ...); what works: drop-block "
                "plans as a qwen3 GGUF, or PyTorch / ONNX"
            )
        kept = [lp for lp in plan.layers if lp.action is not LayerAction.DROP_BLOCK]
        recurrent = [int(lp.action is LayerAction.DROP_ATTENTION) for lp in kept]
        inner = SSM_STATE * SSM_V_HEADS
        keys = {
            "rope.dimension_sections": ([1, 1, 1, 0], V.ARRAY, V.INT32),
            "attention.recurrent_layers": (recurrent, V.ARRAY, V.INT32),
            "ssm.conv_kernel": (SSM_KERNEL, V.UINT32, None),
            "ssm.inner_size": (inner, V.UINT32, None),
            "ssm.state_size": (SSM_STATE, V.UINT32, None),
            "ssm.time_step_rank": (SSM_V_HEADS, V.UINT32, None),
            "ssm.group_count": (SSM_GROUPS, V.UINT32, None),
        }
        tensors = [HostTensor(t.name, t.name) for t in header.tensors if not t.name.startswith("blk.")]
        q_rows = tuple(
            row
            for h in range(n_head)
            for row in (*range(h * head_dim, (h + 1) * head_dim), *(-1,) * head_dim)
        )
        gate_bias = np.concatenate([np.zeros((n_head, head_dim)), np.full((n_head, head_dim), GATE_OPEN)], 1)
        conv = 2 * SSM_STATE * SSM_GROUPS + inner
        zeros = np.zeros
        for lp in kept:
            i = lp.layer
            if lp.action is LayerAction.DROP_ATTENTION:
                layer = [
                    HostTensor(_name(MT.ATTN_NORM, i), values=np.ones(d)),
                    HostTensor(_name(MT.ATTN_QKV, i), values=zeros((conv, d))),
                    HostTensor(_name(MT.ATTN_GATE, i), values=zeros((inner, d))),
                    HostTensor(_name(MT.SSM_CONV1D, i), values=zeros((conv, SSM_KERNEL))),
                    HostTensor(_name(MT.SSM_DT, i, "bias"), values=zeros(SSM_V_HEADS)),
                    HostTensor(_name(MT.SSM_A, i, ""), values=zeros(SSM_V_HEADS)),
                    HostTensor(_name(MT.SSM_BETA, i), values=zeros((SSM_V_HEADS, d))),
                    HostTensor(_name(MT.SSM_ALPHA, i), values=zeros((SSM_V_HEADS, d))),
                    HostTensor(_name(MT.SSM_NORM, i), values=np.ones(SSM_STATE)),
                    HostTensor(_name(MT.SSM_OUT, i), values=zeros((d, inner))),
                ]
            else:
                layer = [
                    HostTensor(_name(MT.ATTN_NORM, i), _name(MT.ATTN_NORM, i)),
                    HostTensor(_name(MT.ATTN_Q, i), _name(MT.ATTN_Q, i), rows=q_rows),
                    HostTensor(_name(MT.ATTN_Q, i, "bias"), values=gate_bias.reshape(-1)),
                    *(HostTensor(_name(t, i), _name(t, i)) for t in (MT.ATTN_K, MT.ATTN_V, MT.ATTN_OUT)),
                    *(HostTensor(_name(t, i), _name(t, i)) for t in (MT.ATTN_Q_NORM, MT.ATTN_K_NORM)),
                ]
            layer.append(HostTensor(_name(MT.ATTN_POST_NORM, i), _name(MT.FFN_NORM, i)))
            layer += [HostTensor(_name(t, i), _name(t, i)) for t in (MT.FFN_GATE, MT.FFN_UP, MT.FFN_DOWN)]
            tensors += layer
        return HostLayout(HOST, keys, tensors)
