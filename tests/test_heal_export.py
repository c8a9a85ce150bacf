"""Export of healed plans (`gatenorm.heal`): GGUF (deci linear attention) and ONNX against PyTorch's
`apply_plan`, the written types and metadata, and the refusals."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_helpers import agreement, llama_cpp_logits, torch_logits
from typer.testing import CliRunner

from exporters.export import export, export_gguf
from exporters.gguf import read_gguf_metadata, read_plan_metadata
from exporters.keys import Keys
from gatenorm.apply import apply_plan, load_model
from gatenorm.cli import app, main
from gatenorm.errors import GatenormError
from gatenorm.heal.fit import HealSettings, fit_repairs
from gatenorm.heal.store import (
    LinearRepair,
    healed,
    load_refits,
    load_repairs,
    save_repairs,
    unhealed,
    weights_path_for,
)
from gatenorm.plan import Healing, Plan
from gatenorm.readers import open_checkpoint
from tests.conftest import make_tiny_model, mixed_plan, tiny_hf

Q = gguf.GGMLQuantizationType
#: tiny llama (6 layers): layer 0's attention dropped and healed (the first written layer), 2 linearized
#: and healed, 3 and the last one dropped whole and healed, 4 dropped whole unhealed; the down projections
#: of layers 1 (kept) and 2 refitted
TINY_ACTIONS = {0: "drop-attention", 2: "linearize", 3: "drop-block", 4: "drop-block", 5: "drop-block"}
TINY_REPAIRED = (0, 2, 3, 5)
TINY_REFITTED = (1, 2)


def _healed(
    folder: Path,
    ckpt,
    actions: dict,
    repairs: dict[int, LinearRepair],
    calib: str = "synthetic",
    refits: dict[int, torch.Tensor] | None = None,
) -> Plan:
    """`ckpt`'s plan doing `actions` (linearize alpha 0.5) with `repairs` and `refits`, saved as
    ``folder/plan.json``."""
    plan = mixed_plan(ckpt, actions, {i: 0.5 for i, a in actions.items() if a == "linearize"})
    weights = weights_path_for(folder / "plan.json")
    save_repairs(weights, repairs, refits)
    form = {"form": "fold", "fold_ridge": 1.0} if refits else {}
    info = Healing(calib=calib, samples=2, length=16, ridge=0.0, weights=str(weights), **form)
    plan = healed(plan, repairs, info, refits)
    plan.save(folder / "plan.json")
    return Plan.load(folder / "plan.json")


def _random_repairs(d: int, layers, bias: bool = False, seed: int = 0) -> dict[int, LinearRepair]:
    g = torch.Generator().manual_seed(seed)
    return {
        i: LinearRepair(0.1 * torch.randn(d, d, generator=g), torch.randn(d, generator=g) if bias else None)
        for i in layers
    }


def _random_refits(folder: Path, layers, seed: int = 0) -> dict[int, torch.Tensor]:
    """Layer -> its down projection plus noise (what a fold writes), for the model in `folder`."""
    model, g = load_model(folder), torch.Generator().manual_seed(seed)
    downs = {i: model.model.layers[i].mlp.down_proj.weight.detach() for i in layers}
    return {i: w + 0.1 * w.abs().mean() * torch.randn(w.shape, generator=g) for i, w in downs.items()}


def _max_delta(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir) -> tuple[Path, Plan]:
    root = tmp_path_factory.mktemp("heal-export")
    folder = tiny_hf(root / "llama", tokenizer_dir, "llama", num_hidden_layers=6)
    ckpt = open_checkpoint(folder)
    repairs = _random_repairs(ckpt.shape.d_model, TINY_REPAIRED)
    plan = _healed(root, ckpt, TINY_ACTIONS, repairs, refits=_random_refits(folder, TINY_REFITTED))
    return folder, plan


def test_tiny_hf_healed_plan_in_llama_cpp_matches_pytorch(tmp_path, tiny):
    folder, plan = tiny
    out = export_gguf(folder, plan, tmp_path / "healed.gguf", quant="F32")
    reader = gguf.GGUFReader(out)
    fields = {key: reader.fields[key].contents() for key in reader.fields}
    assert fields["deci.block_count"] == 5  # layer 4 (unhealed) left out; healed blocks 3 and 5 written
    assert fields["deci.attention.head_count"] == [8] * 5
    assert fields["deci.attention.head_count_kv"] == [0, 2, 0, 0, 0]
    assert fields["deci.feed_forward_length"] == [96, 96, 96, 32, 32]  # healed blocks: a zero FFN
    tensors = {t.name: t for t in reader.tensors}
    for new in (0, 2, 3, 4):  # written indices of source layers 0, 2, 3, 5
        parts = {name.split(".")[2] for name in tensors if name.startswith(f"blk.{new}.")}
        assert parts == {"attn_norm", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"}, new
    for new in (3, 4):
        down = tensors[f"blk.{new}.ffn_down.weight"]
        assert list(down.shape) == [32, 64] and not np.asarray(down.data).any()
    repairs = {i: r.weight.numpy() for i, r in load_repairs(plan).items()}
    assert np.array_equal(np.asarray(tensors["blk.2.attn_output.weight"].data), repairs[2])  # F32: exact
    for i, weight in load_refits(plan).items():  # written index = source index below layer 4
        assert np.array_equal(np.asarray(tensors[f"blk.{i}.ffn_down.weight"].data), weight.numpy()), i
    meta = read_gguf_metadata(out)
    assert meta[Keys.REPAIRED_LAYERS] == list(TINY_REPAIRED)
    assert meta[Keys.REPAIR_SHA256] == [plan.layers[i].repair.sha256 for i in TINY_REPAIRED]
    assert meta[Keys.REFITTED_LAYERS] == list(TINY_REFITTED) and meta[Keys.HEAL_FORM] == "fold"
    assert meta[Keys.REFIT_SHA256] == [plan.layers[i].refit.sha256 for i in TINY_REFITTED]
    assert meta[Keys.HEAL_CALIB] == "synthetic"
    assert set(meta[Keys.CHANGED_TENSORS]) == {f"blk.{i}.attn_output.weight" for i in (0, 2, 3, 4)} | {
        f"blk.{i}.{part}.weight" for i in (3, 4) for part in ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
    } | {f"blk.{i}.ffn_down.weight" for i in TINY_REFITTED}
    assert read_plan_metadata(out).layers == plan.layers
    shown = CliRunner().invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    for text in (
        Keys.REPAIRED_LAYERS,
        Keys.HEAL_CALIB,
        "synthetic",
        plan.layers[3].repair.sha256[:16],
        plan.layers[1].refit.sha256[:16],
    ):
        assert text in shown.output, text

    tokens = list(range(200, 328))
    reference = torch_logits(apply_plan(load_model(folder), plan), tokens)
    for flash_attn in (False, True):
        got = llama_cpp_logits(out, tokens, flash_attn, f32_cache=True)
        kl, top1 = agreement(reference, got)
        delta = _max_delta(reference, got)
        print(f"tiny llama healed F32 (flash_attn={flash_attn}): max|dlogit| {delta:.2e}, KL {kl:.2e}")
        assert delta < 2e-3 and kl < 1e-6 and top1 > 0.95, (delta, kl, top1)
    plain = torch_logits(apply_plan(load_model(folder), unhealed(plan)), tokens)
    assert _max_delta(plain, got) > 0.1  # the repairs are what llama.cpp runs
    layers = [lp.model_copy(update={"refit": None}) for lp in plan.layers]
    unfolded = plan.model_copy(update={"layers": layers})
    no_refits = torch_logits(apply_plan(load_model(folder), unfolded), tokens)
    assert _max_delta(no_refits, got) > 0.02  # and so are the refits (25x the tolerance above)
    with pytest.raises(GatenormError, match="different FFN widths"):  # the healed blocks' width-32 FFN
        load_model(out)  # transformers' llama has one intermediate_size: one line, as for Nemotron files
    fixed = open_checkpoint(out).fixed_layers  # its repaired layers: linear attention, the whole update
    assert fixed == {
        0: ("linearize", 1.0),
        2: ("linearize", 1.0),
        3: ("linearize", 1.0),
        4: ("linearize", 1.0),
    }


FAMILIES = {  # families deci runs with more than a copy: multipliers folded, fused qkv split, qkv biases
    "granite": dict(
        embedding_multiplier=2.0, attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=4.0
    ),
    "phi3": {},
    "qwen2": {},
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_healed_families_in_llama_cpp_match_pytorch(tmp_path, tokenizer_dir, family):
    """Granite: h + s * W norm(h) with the residual multiplier s folded into attn_output (none on a healed
    block) and into the refitted ffn_down; Phi-3: fused qkv and gate_up left out of the repaired layers;
    Qwen2: its q/k/v biases too."""
    folder = tiny_hf(tmp_path / "tiny", tokenizer_dir, family, **FAMILIES[family])  # not named phi3: see
    # tests/test_gguf_deci_families.py
    ckpt = open_checkpoint(folder)
    actions = {1: "linearize", 2: "drop-attention", 3: "drop-block"}
    repairs = _random_repairs(ckpt.shape.d_model, actions, seed=1)
    plan = _healed(tmp_path, ckpt, actions, repairs, refits=_random_refits(folder, (0, 2), seed=1))
    out = export_gguf(folder, plan, tmp_path / "healed.gguf", quant="F32")
    tokens = list(range(300, 364))
    reference = torch_logits(apply_plan(load_model(folder), plan), tokens)
    got = llama_cpp_logits(out, tokens, f32_cache=True)
    delta, (kl, _) = _max_delta(reference, got), agreement(reference, got)
    print(f"{family} healed F32: max|dlogit| {delta:.2e}, KL {kl:.2e}")
    assert delta < 2e-3 and kl < 1e-6, (delta, kl)
    plain = torch_logits(apply_plan(load_model(folder), unhealed(plan)), tokens)
    assert _max_delta(plain, got) > 0.1


def test_healed_deci_file_reads_back_in_pytorch(tmp_path, tiny):
    """gatenorm's deci reader takes a repaired layer's linear attention as the whole update (not the dropped
    attention its plan names), so the file runs in PyTorch as in llama.cpp."""
    folder, _ = tiny
    ckpt = open_checkpoint(folder)
    actions = {1: "drop-attention", 2: "linearize"}
    plan = _healed(tmp_path, ckpt, actions, _random_repairs(ckpt.shape.d_model, actions, seed=2))
    out = export_gguf(folder, plan, tmp_path / "healed.gguf", quant="F32")
    assert open_checkpoint(out).fixed_layers == {1: ("linearize", 1.0), 2: ("linearize", 1.0)}
    tokens = list(range(200, 264))
    reference = torch_logits(apply_plan(load_model(folder), plan), tokens)
    delta = _max_delta(reference, torch_logits(load_model(out), tokens))
    print(f"tiny llama healed deci file in PyTorch: max|dlogit| {delta:.2e}")
    assert delta < 1e-4, delta


def test_q4_k_m_keeps_the_repairs_at_q8_0(tmp_path, tiny):
    folder, plan = tiny
    out = export_gguf(folder, plan, tmp_path / "q4km.gguf", quant="Q4_K_M")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    for new in (0, 2, 3, 4):
        assert types[f"blk.{new}.attn_output.weight"] is Q.Q8_0, new
    for new in TINY_REFITTED:
        assert types[f"blk.{new}.ffn_down.weight"] is Q.Q8_0, new
    assert types["blk.0.ffn_down.weight"] is not Q.Q8_0  # not refitted: the Q4_K_M mix
    assert types["blk.1.attn_output.weight"] is not Q.Q8_0  # a kept layer's: the Q4_K_M mix
    assert types["blk.1.attn_q.weight"] not in (Q.F32, Q.F16, Q.Q8_0)
    tokens = list(range(200, 264))
    reference = torch_logits(apply_plan(load_model(folder), plan), tokens)
    kl, _ = agreement(reference, llama_cpp_logits(out, tokens))
    assert kl < 5e-3, kl


@pytest.fixture(scope="module")
def smollm2_healed(tmp_path_factory, smollm2_scored, smollm2_model, smollm2_tokens) -> Plan:
    """SmolLM2 with layer 0's and 5's attention dropped, 17 linearized, 26 dropped whole (all healed by a
    real fit, the default fold, on 4 windows of its text: maps on 0, which has no MLP below, and 17; 5 and
    26 folded into the down projections of 4 and 25; the kept layers right above them, 1, 6, 18 and 27,
    refitted for the drift) and block 29 dropped unhealed."""
    ckpt = smollm2_scored[0]
    actions = {0: "drop-attention", 5: "drop-attention", 17: "linearize", 26: "drop-block"}
    plan = mixed_plan(ckpt, actions, {17: 0.6}, smollm2_scored[1])
    windows = np.array(smollm2_tokens[:256]).reshape(4, 64)
    fitted = fit_repairs(copy.deepcopy(smollm2_model), plan, windows, HealSettings(samples=4, length=64))
    assert set(fitted.repairs) == {0, 17} and set(fitted.refits) == {1, 4, 6, 18, 25, 27}
    actions[29] = "drop-block"
    folder = tmp_path_factory.mktemp("smollm2-healed")
    return _healed(folder, ckpt, actions, fitted.repairs, "wiki-heldout", fitted.refits)


def test_smollm2_healed_keep_types_and_f32_logits(
    tmp_path, smollm2_gguf, smollm2_scored, smollm2_model, smollm2_healed, smollm2_tokens
):
    plan = smollm2_healed
    out = export_gguf(smollm2_scored[0], plan, tmp_path / "keep.gguf")  # the source's Q4_1
    source = {t.name: t for t in gguf.GGUFReader(smollm2_gguf).tensors}
    written = {t.name: t for t in gguf.GGUFReader(out).tensors}
    index = {old: new for new, old in enumerate(i for i in range(30) if i not in (26, 29))}
    old_of = {new: old for old, new in index.items()}
    changed = set(read_gguf_metadata(out)[Keys.CHANGED_TENSORS])
    for name, t in written.items():
        if name in changed:
            continue
        _, new, rest = name.split(".", 2) if name.startswith("blk.") else (None, None, None)
        src = source[name if new is None else f"blk.{old_of[int(new)]}.{rest}"]
        assert t.tensor_type == src.tensor_type and bytes(t.data) == bytes(src.data), name
    for name in [f"blk.{index[old]}.attn_output.weight" for old in (0, 17)] + [
        f"blk.{index[old]}.ffn_down.weight" for old in (1, 4, 6, 18, 25, 27)
    ]:
        assert written[name].tensor_type is Q.Q8_0 and name in changed, name
    assert f"blk.{index[5]}.attn_output.weight" not in written  # folded: the attention is gone
    assert source["blk.4.ffn_down.weight"].tensor_type not in (Q.Q8_0, Q.F16, Q.F32)

    f32 = export_gguf(smollm2_scored[0], plan, tmp_path / "f32.gguf", quant="F32")
    reference = torch_logits(apply_plan(copy.deepcopy(smollm2_model), plan), smollm2_tokens)
    got = llama_cpp_logits(f32, smollm2_tokens, flash_attn=True)
    kl, top1 = agreement(reference, got)
    delta = _max_delta(reference, got)
    print(f"SmolLM2 healed F32: max|dlogit| {delta:.3f}, KL {kl:.2e}, top-1 {top1:.3f}")
    assert kl < 1e-3 and top1 > 0.99, (kl, top1)
    plain = torch_logits(apply_plan(copy.deepcopy(smollm2_model), unhealed(plan)), smollm2_tokens)
    assert agreement(plain, got)[0] > 1e-2  # the export runs the repairs, not the unhealed plan


# --- refusals --------------------------------------------------------------------------------------------


def _cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["gatenorm", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code or 0, capsys.readouterr().err


def _assert_refused(code: int, err: str, out: Path, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gatenorm: error: "), (code, err)
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists() and not list(out.parent.glob(f"{out.name}*")), list(out.parent.iterdir())


def test_a_repair_with_a_bias_is_refused(tmp_path, tiny, monkeypatch, capsys):
    folder, _ = tiny
    ckpt = open_checkpoint(folder)
    _healed(tmp_path, ckpt, {2: "drop-attention"}, _random_repairs(ckpt.shape.d_model, [2], bias=True))
    out = tmp_path / "out" / "biased.gguf"
    code, err = _cli(monkeypatch, capsys, "export", folder, "--plan", tmp_path / "plan.json", "-o", out)
    _assert_refused(code, err, out, "layer 2", "adds no bias", "fit with bias off")


def test_a_tampered_weights_file_is_refused(tmp_path, tiny, monkeypatch, capsys):
    folder, _ = tiny
    ckpt = open_checkpoint(folder)
    repairs = _random_repairs(ckpt.shape.d_model, [1, 3])
    plan = _healed(tmp_path, ckpt, {1: "drop-attention", 3: "linearize"}, repairs)
    save_repairs(plan.healing.weights, {1: repairs[1], 3: LinearRepair(repairs[3].weight * 1.001)})
    for to in ("gguf", "onnx"):
        out = tmp_path / "out" / f"tampered.{to}"
        code, err = _cli(
            monkeypatch, capsys, "export", folder, "--plan", tmp_path / "plan.json", "-o", out, "--to", to
        )
        _assert_refused(code, err, out, "layer 3", "do not match the plan's hash")


def test_families_without_linear_attention_in_gguf_refuse_healed_plans(tmp_path, monkeypatch, capsys):
    for model_type, actions in (("gemma2", {2: "drop-block"}), ("qwen3", {2: "drop-attention"})):
        folder = tmp_path / model_type
        make_tiny_model(folder, model_type, head_dim=8)
        ckpt = open_checkpoint(folder)
        _healed(folder, ckpt, actions, _random_repairs(ckpt.shape.d_model, actions))
        out = tmp_path / "out" / f"{model_type}.gguf"
        code, err = _cli(monkeypatch, capsys, "export", folder, "--plan", folder / "plan.json", "-o", out)
        _assert_refused(code, err, out, "repair of layer 2", "deci graph", "--to onnx")


# --- ONNX -----------------------------------------------------------------------------------------------


def test_onnx_fp32_healed_export_matches_pytorch(tmp_path, tiny_llama_dir):
    import onnx

    from exporters.onnx.metadata import read_metadata
    from exporters.onnx.runner import OnnxRunner

    folder = tiny_llama_dir
    ckpt = open_checkpoint(folder)
    actions = {1: "drop-attention", 2: "linearize", 3: "drop-block"}
    repairs = _random_repairs(ckpt.shape.d_model, actions, bias=True)  # ONNX has a slot for the bias
    plan = _healed(tmp_path, ckpt, actions, repairs, refits=_random_refits(folder, (0, 1)))
    out = export(folder, plan, tmp_path / "onnx", "onnx")
    graph = onnx.load(str(out / "onnx" / "model.onnx"))
    meta = read_metadata({p.key: p.value for p in graph.metadata_props})
    assert meta[Keys.REPAIRED_LAYERS] == [1, 2, 3] and meta[Keys.HEAL_CALIB] == "synthetic"
    assert meta[Keys.REPAIR_SHA256] == [plan.layers[i].repair.sha256 for i in (1, 2, 3)]
    inits = {i.name for i in graph.graph.initializer}
    assert meta[Keys.REFITTED_LAYERS] == [0, 1]
    assert set(meta[Keys.CHANGED_TENSORS]) <= inits and len(meta[Keys.CHANGED_TENSORS]) == 6 + 2
    for i in (1, 2, 3):  # no attention left in a repaired layer: neither projections nor a softmax
        nodes = [n for n in graph.graph.node if f"layers.{i}/" in n.name]
        assert not [n for n in nodes if "self_attn" in n.name or n.op_type == "Softmax"], i
    ids = list(range(5, 37))
    reference = torch_logits(apply_plan(load_model(folder), plan), ids)
    got = OnnxRunner(out).logits(np.array([ids]))[0]
    delta = _max_delta(reference, got)
    print(f"tiny llama healed ONNX fp32: max|dlogit| {delta:.2e}")
    assert delta < 1e-4, delta
