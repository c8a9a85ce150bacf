"""deci GGUFs as input: gatenorm's own pruned exports and Nemotron-NAS style files (per-layer head counts
and FFN widths) through score -> plan -> export (re-prune, requantize) -> PyTorch, checked on llama.cpp
and transformers logits (F32, tiny random models)."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
from deci_helpers import nemotron_style
from gguf_helpers import agreement, llama_cpp_logits, torch_logits
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from exporters.export import export_gguf
from exporters.gguf import read_plan_metadata
from gatenorm.apply import apply_plan, load_model
from gatenorm.cli import app
from gatenorm.errors import GatenormError
from gatenorm.methods import make_method_plan
from gatenorm.plan import LayerAction, Plan
from gatenorm.readers import open_checkpoint
from tests.conftest import mixed_plan, tiny_hf

A = LayerAction
TOKENS = list(range(300, 364))
#: the plan of the first export, per family (qwen2: no linearize, its v/o have biases)
FIRST = {
    "llama": ({0: A.DROP_ATTENTION, 1: A.DROP_BLOCK, 3: A.LINEARIZE, 4: A.DROP_ATTENTION}, {3: 0.7}),
    "qwen2": ({0: A.DROP_ATTENTION, 1: A.DROP_BLOCK, 4: A.DROP_ATTENTION}, {}),
}


def _report(label: str, reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    kl, _ = agreement(reference, other)
    delta = float(np.abs(reference - other).max())
    print(f"{label}: max |dlogit| {delta:.2e}, KL {kl:.2e}")
    return delta, kl


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.output


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tokenizer_dir):
    """family -> (HF folder, first plan, its F32 deci export)."""
    built = {}
    for family, (actions, alphas) in FIRST.items():
        root = tmp_path_factory.mktemp(f"deci-{family}")
        folder = tiny_hf(root / family, tokenizer_dir, family, num_hidden_layers=6)
        plan = mixed_plan(open_checkpoint(folder), actions, alphas)
        built[family] = (folder, plan, export_gguf(folder, plan, root / "pruned.gguf", quant="F32"))
    return built


@pytest.mark.parametrize("family", sorted(FIRST))
def test_gatenorm_export_read_back_and_repruned_equals_the_combined_plan(tmp_path, pruned, family):
    folder, first, deci = pruned[family]
    ckpt = open_checkpoint(deci)
    assert ckpt.arch.name == "deci" and ckpt.shape.n_layers == 5  # the dropped block is not in the file
    expected = {0: ("drop-attention", None), 3: ("drop-attention", None)}  # file layers (source 0, 4)
    if family == "llama":
        expected[2] = ("linearize", 0.7)
    assert ckpt.fixed_layers == expected
    # PyTorch: the file in transformers' own family with its implied plan equals the first plan applied
    reference = torch_logits(apply_plan(load_model(folder), first), TOKENS)
    delta, kl = _report(f"{family} deci file in PyTorch", reference, torch_logits(load_model(deci), TOKENS))
    assert delta < 1e-4 and kl < 1e-8
    # score / plan / export through the CLI: one more attention dropped, the file's layers stay as they are
    shown = _cli("score", deci)
    assert "gate-norm scores" in shown
    plan_path, again = tmp_path / "more.json", tmp_path / "again.gguf"
    _cli("plan", deci, "--drop", "1", "-o", plan_path)
    more = Plan.load(plan_path)
    assert more.source.architecture == "deci" and more.source.n_layers == 5
    new = [lp.layer for lp in more.layers if lp.layer not in expected and lp.action is not A.KEEP]
    assert len(new) == 1 and more.budget == len(expected) + 1
    for layer, (action, alpha) in expected.items():
        assert (more.layers[layer].action.value, more.layers[layer].alpha) == (action, alpha)
    _cli("export", deci, "--plan", plan_path, "--quant", "F32", "-o", again)
    combined = read_plan_metadata(again)  # recorded against the original model
    assert combined.source == first.source
    source_layer = [lp.layer for lp in first.layers if lp.action is not A.DROP_BLOCK][new[0]]
    assert combined.layers[source_layer].action is A.DROP_ATTENTION
    assert combined.budget == first.budget + 1
    assert "drop-attention" in _cli("inspect", again)
    name = gguf.GGUFReader(again).fields["general.name"].contents()
    assert name.count("gatenorm:") == 1 and f"pruned {combined.budget} of 6 layers" in name
    direct = export_gguf(folder, combined, tmp_path / "direct.gguf", quant="F32")
    assert (
        gguf.GGUFReader(again).fields["deci.attention.head_count"].contents()
        == gguf.GGUFReader(direct).fields["deci.attention.head_count"].contents()
    )
    re_logits = llama_cpp_logits(again, TOKENS)
    delta, kl = _report(f"{family} re-pruned vs direct export", llama_cpp_logits(direct, TOKENS), re_logits)
    assert delta < 1e-4 and kl < 1e-8
    combined_torch = torch_logits(apply_plan(load_model(folder), combined), TOKENS)
    delta, kl = _report(f"{family} re-pruned in llama.cpp vs PyTorch", combined_torch, re_logits)
    assert kl < 1e-5
    # and in PyTorch: the file loaded and pruned further equals the combined plan on the original
    further = torch_logits(apply_plan(load_model(deci), more), TOKENS)
    delta, kl = _report(f"{family} deci + plan in PyTorch", combined_torch, further)
    assert delta < 1e-4


def test_requantized_deci_file(tmp_path, pruned):
    folder, first, deci = pruned["llama"]
    ckpt = open_checkpoint(deci)
    same = make_method_plan(ckpt, "gate-norm", budget=0)  # nothing more: only the file's own layers
    assert same.changed == sorted(ckpt.fixed_layers)
    out = export_gguf(deci, same, tmp_path / "q8.gguf", quant="Q8_0")
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "deci"
    assert {t.tensor_type.name for t in reader.tensors if t.name == "blk.1.attn_q.weight"} == {"Q8_0"}
    assert read_plan_metadata(out) == first
    reference = torch_logits(apply_plan(load_model(folder), first), TOKENS)
    _, kl = _report("llama deci requantized Q8_0", reference, llama_cpp_logits(out, TOKENS))
    assert kl < 1e-3


def test_budgets_count_what_remains_and_file_layers_stay(tmp_path, pruned):
    _, _, deci = pruned["llama"]
    ckpt = open_checkpoint(deci)  # 5 layers, 3 of them without attention
    with pytest.raises(GatenormError, match=r"2 layers with attention left \(3 already without\)"):
        make_method_plan(ckpt, "gate-norm", budget=2)
    plan = make_method_plan(ckpt, "gate-norm", speedup=1.01)  # over the file as it is: one more layer
    assert len(plan.changed) == 4
    with pytest.raises(GatenormError, match=r"attention-cosine on .*what works: gate-norm"):
        make_method_plan(ckpt, "attention-cosine", budget=1)
    keep_all = Plan.model_validate(
        {
            **plan.model_dump(mode="json"),
            "budget": 0,
            "layers": [{"layer": lp.layer, "score": lp.score, "action": "keep"} for lp in plan.layers],
        }
    )
    keep_all.save(tmp_path / "keep.json")
    cmd = [sys.executable, "-m", "gatenorm.cli", "export", str(deci), "--plan", str(tmp_path / "keep.json")]
    done = subprocess.run([*cmd, "-o", str(tmp_path / "out.gguf")], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "layer 0 of this deci file keep" in lines[0] and "what works" in lines[0], (
        lines
    )
    assert not (tmp_path / "out.gguf").exists()


def test_nemotron_style_file(tmp_path, tokenizer_dir):
    """No gatenorm keys, layers by their head counts alone; one layer's FFN narrower: llama.cpp runs it,
    gatenorm re-prunes it, PyTorch refuses it in one line (transformers' llama has one FFN width)."""
    folder = tiny_hf(tmp_path / "llama", tokenizer_dir, "llama", num_hidden_layers=5)
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.3.mlp.down_proj.weight"][:, 40:] = 0  # units past 40 add nothing: cut them
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    plan = mixed_plan(open_checkpoint(folder), {1: A.DROP_ATTENTION, 2: A.LINEARIZE}, {2: 1.3})
    wide = nemotron_style(export_gguf(folder, plan, tmp_path / "g.gguf", quant="F32"), tmp_path / "wide.gguf")
    narrow = nemotron_style(tmp_path / "g.gguf", tmp_path / "narrow.gguf", {3: 40})
    ckpt = open_checkpoint(narrow)
    assert ckpt.fixed_layers == {1: ("drop-attention", None), 2: ("linearize", 1.0)}
    shown = _cli("inspect", narrow)
    assert "no gatenorm plan" in shown and "linear attention" in shown
    reference = torch_logits(apply_plan(load_model(folder), plan), TOKENS)
    delta, kl = _report("nemotron-style file in PyTorch", reference, torch_logits(load_model(wide), TOKENS))
    assert delta < 1e-4
    delta, kl = _report(
        "nemotron-style per-layer FFN in llama.cpp", reference, llama_cpp_logits(narrow, TOKENS)
    )
    assert kl < 1e-5
    with pytest.raises(GatenormError, match=r"different FFN widths \[40, 96\].*what works: llama.cpp"):
        load_model(narrow)
    more = make_method_plan(ckpt, "gate-norm", budget=1)
    out = export_gguf(narrow, more, tmp_path / "more.gguf", quant="F32")
    fields = gguf.GGUFReader(out).fields
    assert fields["deci.feed_forward_length"].contents() == [96, 96, 96, 40, 96]
    assert read_plan_metadata(out) == more  # no earlier plan to compose with
    expected = torch_logits(apply_plan(load_model(wide), more), TOKENS)
    delta, kl = _report("nemotron-style re-pruned", expected, llama_cpp_logits(out, TOKENS))
    assert kl < 1e-5


def test_validate_deci_file_in_llama_cpp_against_pytorch(tmp_path, pruned):
    """The validator runs a deci file in both runtimes: llama.cpp (auto) and PyTorch (--candidate-runtime
    torch: tokenizer and model loaded from the file by gatenorm)."""
    _, _, deci = pruned["llama"]
    report = tmp_path / "report.json"
    args = ["validate", deci, deci, "--candidate-runtime", "torch", "--tasks", "none", "--ctx", "64"]
    _cli(*args, "--max-tokens", "256", "--json", report)
    agreement_stats = json.loads(report.read_text())["agreement"]
    print(f"validate deci llama.cpp vs PyTorch: mean KLD {agreement_stats['kld_mean']:.2e}")
    assert agreement_stats["kld_mean"] < 1e-5


def test_attention_free_file_layer_becoming_the_first_written_layer(tmp_path, pruned):
    """Dropping the file's first blocks makes an attention-free layer (no attn_norm, no attn_output) the first
    written one: it is written as zero linear attention (a ones attn_norm, a zero attn_output), since
    llama.cpp reads the head size from layer 0."""
    _, _, deci = pruned["llama"]
    ckpt = open_checkpoint(deci)  # file layers: 0 zero-linear, 1 keep, 2 linear, 3 no attention, 4 keep
    plan = mixed_plan(ckpt, {0: A.DROP_BLOCK, 1: A.DROP_BLOCK, 2: A.DROP_BLOCK}, {})
    assert plan.layers[3].action is A.DROP_ATTENTION  # the file's own state, kept by the plan
    out = export_gguf(deci, plan, tmp_path / "out.gguf", quant="F32")
    reader = gguf.GGUFReader(out)
    assert reader.fields["deci.attention.head_count"].contents() == [8, 8]
    assert reader.fields["deci.attention.head_count_kv"].contents() == [0, 2]
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert not tensors["blk.0.attn_output.weight"].any() and (tensors["blk.0.attn_norm.weight"] == 1).all()
    reference = torch_logits(apply_plan(load_model(deci), plan), TOKENS)
    _, kl = _report("deci attention-free layer written first", reference, llama_cpp_logits(out, TOKENS))
    assert kl < 1e-5
