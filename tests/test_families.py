"""Every architecture family through score -> plan -> apply, on tiny random checkpoints built from
transformers configs (no downloads), each checked against an independent reference:

- scores: Gate-Norm against float64 brute force on the q/k weights read straight from the safetensors file,
  the norm gain against the stored one, and the calibration statistics (attention cosine, block cosine,
  the linearized attention's least-squares alpha) against the stock transformers model with one layer's
  MLP output zeroed by a hook;
- a pruned model (drop-attention / drop-block) against the stock model with the dropped sublayers' outputs
  zeroed by forward hooks; a linearized layer against the formula written out by hand here;
- every registered method plans and applies on every family, and the pruned model's cached generation
  equals its full recomputation.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gatenorm.apply import AttentionFreeLayer, IdentityLayer, LinearAttentionLayer, apply_plan, load_model
from gatenorm.architectures import get_architecture
from gatenorm.errors import GatenormError
from gatenorm.methods import MethodOptions, make_method_plan
from gatenorm.methods.calibration import Calibration, TailRunner, layer_statistics
from gatenorm.methods.cost import cost_model
from gatenorm.methods.registry import METHODS
from gatenorm.readers import open_checkpoint
from gatenorm.scoring import gate_norm, gate_norm_head
from tests.conftest import TINY_LLAMA, mixed_plan, tiny_hf
from tests.test_scoring import brute_force

IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
#: model_type -> config overrides of the tiny model (4 layers, d 64, 8 heads, 2 KV heads)
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 6},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma2": {
        "head_dim": 8,
        "query_pre_attn_scalar": 8,
        "sliding_window": 6,
        "layer_types": ALTERNATING,
        "attn_logit_softcapping": 20.0,
        "final_logit_softcapping": 10.0,
    },
    "gemma3_text": {
        "head_dim": 8,
        "query_pre_attn_scalar": 8,
        "sliding_window": 6,
        "layer_types": ALTERNATING,
        "rope_local_base_freq": 100.0,
    },
    "phi3": {},
    "granite": {
        "embedding_multiplier": 2.0,
        "attention_multiplier": 0.2,
        "residual_multiplier": 0.5,
        "logits_scaling": 4.0,
    },
    "olmo2": {},
    "smollm3": {},
}
GEMMA = ("gemma2", "gemma3_text")
POST_NORM_ONLY = ("olmo2",)
N_HEAD, N_KV, D = (
    TINY_LLAMA["num_attention_heads"],
    TINY_LLAMA["num_key_value_heads"],
    TINY_LLAMA["hidden_size"],
)

_built: dict[str, tuple] = {}


@pytest.fixture(params=sorted(FAMILIES))
def family(request, tmp_path_factory, tokenizer_dir):
    """(model_type, folder, checkpoint, stock model, state dict) of one family, built once per session."""
    name = request.param
    if name not in _built:
        folder = tiny_hf(tmp_path_factory.mktemp(name), tokenizer_dir, name, **IDS, **FAMILIES[name])
        sd = load_file(folder / "model.safetensors")
        _built[name] = (name, folder, open_checkpoint(folder), load_model(folder), sd)
    return _built[name]


def _attention_rows(sd: dict, model_type: str, layer: int) -> dict[str, torch.Tensor]:
    """q, k, v, o weights (and v/o biases) of `layer` straight from the state dict, HF layout."""
    p = f"model.layers.{layer}.self_attn."
    if model_type == "phi3":
        qkv = sd[p + "qkv_proj.weight"]
        dh = D // N_HEAD
        q, k, v = qkv.split([N_HEAD * dh, N_KV * dh, N_KV * dh])
        out = {"q": q, "k": k, "v": v}
    else:
        out = {part: sd[f"{p}{part}_proj.weight"] for part in "qkv"}
    out["o"] = sd[p + "o_proj.weight"]
    for part in "vo":
        out[f"{part}_bias"] = sd.get(f"{p}{part}_proj.bias")
    return out


def _gain(sd: dict, model_type: str, name: str) -> torch.Tensor:
    """The multiplier of a stored RMSNorm weight (Gemma multiplies by 1 + w)."""
    return sd[name] + 1 if model_type in GEMMA else sd[name]


def test_scores_match_numpy_reference(family):
    model_type, _, ckpt, _, sd = family
    assert ckpt.arch is get_architecture(model_type)
    for layer in range(ckpt.shape.n_layers):
        ref = _attention_rows(sd, model_type, layer)
        w = ckpt.read_attention(layer, ("q", "k", "v", "o"))
        for part in "qkvo":
            torch.testing.assert_close(getattr(w, part), ref[part], rtol=0, atol=0)
        whole, per_head = brute_force(ref["q"].numpy(), ref["k"].numpy(), N_HEAD, N_KV)
        assert gate_norm(w) == pytest.approx(whole, rel=1e-5)
        assert gate_norm_head(w) == pytest.approx(per_head, rel=1e-5)
        if model_type in POST_NORM_ONLY:
            expected = torch.ones(D)  # the attention reads the raw residual stream
        else:
            expected = _gain(sd, model_type, f"model.layers.{layer}.input_layernorm.weight")
        torch.testing.assert_close(ckpt.read_norm(layer), expected)


def test_cost_model_reads_the_mlp_width(family):
    _, _, ckpt, _, _ = family
    model = cost_model(ckpt)
    assert model.ffn == TINY_LLAMA["intermediate_size"]  # Phi-3's fused gate_up is 2x as wide
    assert model.mlp == 2.0 * 3 * D * TINY_LLAMA["intermediate_size"]


def _zero_output(module: torch.nn.Module):
    def hook(_module, _args, output):
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    return module.register_forward_hook(hook)


def _run(model, ids: torch.Tensor, capture: list[int]) -> tuple[dict, dict]:
    """Inputs and outputs of the decoder layers `capture` in a forward pass over `ids`."""
    arch = get_architecture(model.config.model_type)
    inputs, outputs, handles = {}, {}, []
    for i in capture:
        layer = arch.decoder_layers(model)[i]

        def pre(_m, args, kwargs, i=i):
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).double()

        def post(_m, _args, output, i=i):
            outputs[i] = (output[0] if isinstance(output, tuple) else output).double()

        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.register_forward_hook(post)]
    with torch.no_grad():
        model.model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return inputs, outputs


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def _rms(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def _linear_attention(sd, model_type, layer, x_in, eps, residual_scale) -> torch.Tensor:
    """Written out: what o_proj(repeat_kv(v_proj(x_in))) adds to the residual stream (post-norm included)."""
    w = _attention_rows(sd, model_type, layer)
    v = x_in @ w["v"].T + (0 if w["v_bias"] is None else w["v_bias"])
    v = v.unflatten(-1, (N_KV, -1)).repeat_interleave(N_HEAD // N_KV, dim=-2).flatten(-2)
    out = v @ w["o"].T + (0 if w["o_bias"] is None else w["o_bias"])
    if model_type in GEMMA or model_type in POST_NORM_ONLY:
        out = _rms(out, _gain(sd, model_type, f"model.layers.{layer}.post_attention_layernorm.weight"), eps)
    return residual_scale * out


def _attention_input(sd, model_type, layer, h, eps) -> torch.Tensor:
    if model_type in POST_NORM_ONLY:
        return h
    return _rms(h, _gain(sd, model_type, f"model.layers.{layer}.input_layernorm.weight"), eps)


def _residual_scale(model) -> float:
    return float(getattr(model.config, "residual_multiplier", 1.0))


def test_calibration_statistics_match_hooked_stock_model(family):
    model_type, _, ckpt, base, sd = family
    n, eps = ckpt.shape.n_layers, base.config.rms_norm_eps
    windows = np.random.default_rng(0).integers(3, 1000, size=(2, 12))
    stats = layer_statistics(base, windows, batch=2)
    ids = torch.from_numpy(windows)
    x, y = _run(base, ids, list(range(n)))
    arch = get_architecture(model_type)
    for i in range(n):
        assert stats.block_cosine[i] == pytest.approx(_cos(x[i], y[i]), rel=1e-4)
        handle = _zero_output(arch.decoder_layers(base)[i].mlp)
        try:
            _, z = _run(base, ids, [i])  # layer i with its MLP output zeroed: X + A
        finally:
            handle.remove()
        assert stats.attention_cosine[i] == pytest.approx(_cos(x[i], z[i]), rel=1e-4)
        attn = z[i] - x[i]
        x_in = _attention_input(sd, model_type, i, x[i].float(), eps)
        lin = _linear_attention(sd, model_type, i, x_in, eps, _residual_scale(base)).double()
        alpha = float((attn * lin).sum() / (lin * lin).sum())
        assert stats.linear_alpha[i] == pytest.approx(alpha, rel=1e-3, abs=1e-6)
    assert min(stats.attention_cosine) < 0.999  # attention matters: the comparison is not vacuous


@pytest.mark.parametrize("action", ["drop-attention", "drop-block"])
def test_pruned_model_matches_hooked_stock_model(family, action):
    model_type, _, ckpt, base, _ = family
    changed = [1, 2]
    pruned = apply_plan(copy.deepcopy(base), mixed_plan(ckpt, dict.fromkeys(changed, action), {}))
    arch = get_architecture(model_type)
    expected_type = AttentionFreeLayer if action == "drop-attention" else IdentityLayer
    assert all(type(arch.decoder_layers(pruned)[i]) is expected_type for i in changed)
    reference = copy.deepcopy(base)
    handles = []
    for i in changed:
        layer = arch.decoder_layers(reference)[i]
        handles.append(_zero_output(layer.self_attn))
        if action == "drop-block":
            handles.append(_zero_output(layer.mlp))
    ids = torch.from_numpy(np.random.default_rng(1).integers(3, 1000, size=(2, 12)))
    with torch.no_grad():
        got = pruned(ids, use_cache=True).logits
        want = reference(ids, use_cache=False).logits
        unpruned = base(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - unpruned).abs().max() > 1e-3  # the plan changed the model


def test_linearized_layer_matches_formula(family):
    model_type, _, ckpt, base, sd = family
    alpha, layer, eps = 0.7, 1, base.config.rms_norm_eps
    pruned = apply_plan(copy.deepcopy(base), mixed_plan(ckpt, {layer: "linearize"}, {layer: alpha}))
    module = get_architecture(model_type).decoder_layers(pruned)[layer]
    assert isinstance(module, LinearAttentionLayer) and not hasattr(module, "self_attn")
    h = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = module(h)
    got = got[0] if isinstance(got, tuple) else got
    # the formula: h1 = h + alpha * update(L), then the family's MLP step
    s, p = _residual_scale(base), f"model.layers.{layer}."
    h1 = h + alpha * _linear_attention(sd, model_type, layer, _attention_input(sd, model_type, layer, h, eps),
                                       eps, s)  # fmt: skip
    if model_type in POST_NORM_ONLY:
        x = h1
    else:
        norm = "pre_feedforward_layernorm" if model_type in GEMMA else "post_attention_layernorm"
        x = _rms(h1, _gain(sd, model_type, p + norm + ".weight"), eps)
    if model_type == "phi3":
        gate, up = (x @ sd[p + "mlp.gate_up_proj.weight"].T).chunk(2, dim=-1)
    else:
        gate, up = x @ sd[p + "mlp.gate_proj.weight"].T, x @ sd[p + "mlp.up_proj.weight"].T
    act = (
        torch.nn.functional.gelu(gate, approximate="tanh")
        if model_type in GEMMA
        else torch.nn.functional.silu(gate)
    )
    mlp = (act * up) @ sd[p + "mlp.down_proj.weight"].T
    if model_type in GEMMA or model_type in POST_NORM_ONLY:
        mlp = _rms(mlp, _gain(sd, model_type, p + "post_feedforward_layernorm.weight"), eps)
    torch.testing.assert_close(got, h1 + s * mlp, rtol=1e-5, atol=1e-5)


def test_tail_runner_matches_full_forward(family):
    """HARP's search reruns the layers above one layer (per-layer sliding masks, the family's rotary inputs
    and logits): from any start it gives the full model's NLL."""
    _, _, _, base, _ = family
    windows = np.random.default_rng(4).integers(3, 1000, size=(2, 12))  # longer than the sliding windows
    runner = TailRunner(base, windows, keep_from=0, batch=2)
    ids = torch.from_numpy(windows)
    with torch.no_grad():
        logits = base(ids, use_cache=False).logits[:, :-1]
    full = float(
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    )
    for start in (0, 2, 3):
        assert runner.nll(start) == pytest.approx(full, rel=1e-5)


def test_onnx_refusal_is_one_line(family, monkeypatch):
    """Every family exports to ONNX today (tests/test_onnx_export.py); an ONNX spec's `refusal` (for a
    family that cannot) stops the export in one line."""
    from exporters.onnx.export import check_exportable
    from exporters.onnx.families import onnx_family

    model_type, _, _, base, _ = family
    arch = get_architecture(model_type)
    assert not onnx_family(arch).refusal
    monkeypatch.setattr(type(onnx_family(arch)), "refusal", "a reason")
    match = f"cannot export {arch.name} to ONNX: a reason; what works"
    with pytest.raises(GatenormError, match=match) as refused:
        check_exportable(arch, base.config)
    assert "\n" not in str(refused.value)


#: tiny families llama.cpp cannot host (transformers 5 builds the tiny gemma2 with an untied LM head;
#: llama.cpp's gemma2 reads it from token_embd): their synthetic text is sampled by transformers instead
TORCH_SAMPLED = ("gemma2",)


def _plans_apply_and_cache(family, methods) -> None:
    model_type, _, ckpt, base, _ = family
    options = MethodOptions(calib=Calibration("synthetic", samples=1, length=12))
    ids = torch.from_numpy(np.random.default_rng(3).integers(3, 1000, size=(1, 5)))
    for method in methods:
        plan = make_method_plan(ckpt, method, 2, options=options)
        assert plan.budget == 2 and plan.layers[0].action.value == "keep"
        if method == "mixed-synthetic":  # phi3 too: its temporary GGUF is not named like a Phi-3
            sampler = "transformers" if model_type in TORCH_SAMPLED else "llama.cpp"
            assert plan.calibration.generator.startswith(sampler)
        pruned = apply_plan(copy.deepcopy(base), plan)
        kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            cached = pruned.generate(ids, use_cache=True, **kwargs)
            full = pruned.generate(ids, use_cache=False, **kwargs)
        assert cached.tolist() == full.tolist(), f"{model_type} {method}: cache differs"


def test_weight_methods_plan_and_apply(family):
    """Every weights-only method (their scores' parts are checked above) plans and applies."""
    _plans_apply_and_cache(family, [m for m, info in METHODS.items() if not info.data])


@pytest.mark.slow
def test_data_methods_plan_and_apply(family):
    """Every calibrated method plans and applies (its statistics are checked above; slow: a model load and
    generated text per method)."""
    _plans_apply_and_cache(family, [m for m, info in METHODS.items() if info.data])


# ---- the layer-sequential engine (gatenorm.sequential) against the whole loaded model -----------------


def _assert_same_statistics(old, new) -> None:
    for name in ("attention_cosine", "block_cosine", "attention_ratio", "linear_alpha", "linear_cosine"):
        assert getattr(new, name) == pytest.approx(getattr(old, name), rel=1e-5, abs=1e-9), name
    assert new.tokens == old.tokens


def test_sequential_statistics_equal_whole_model(family):
    """The calibration statistics of every calibrated method, a layer at a time, equal the hooked whole
    model's (rel 1e-5), so their rankings and plans are the same."""
    from gatenorm.methods.calibration import sequential_layer_statistics
    from gatenorm.sequential import SequentialModel

    _, folder, _, base, _ = family
    windows = np.random.default_rng(5).integers(3, 1000, size=(3, 12))
    old = layer_statistics(base, windows, batch=2)
    _assert_same_statistics(old, sequential_layer_statistics(SequentialModel(folder), windows, batch=2))


def test_sequential_tail_runner_and_harp_alphas_equal_whole_model(family):
    """HARP's search on the engine's tail runner: the same NLLs and the same calibrated alphas."""
    from gatenorm.methods.calibration import SequentialTailRunner
    from gatenorm.methods.harp_alpha import calibrate_alphas
    from gatenorm.sequential import SequentialModel

    _, folder, _, base, _ = family
    windows = np.random.default_rng(6).integers(3, 1000, size=(3, 12))
    old = TailRunner(base, windows, keep_from=2, batch=2)
    new = SequentialTailRunner(SequentialModel(folder), windows, keep_from=2, batch=2)
    try:
        for start in (2, 3):
            assert new.nll(start) == pytest.approx(old.nll(start), rel=1e-5)
        layers = [2, 3]
        fast = dict(grid=(0.0, 0.6, 1.2), refine=2)
        assert calibrate_alphas(new, layers, **fast) == pytest.approx(
            calibrate_alphas(old, layers, **fast), rel=1e-5
        )
    finally:
        new.close()


def whole_model_agreement(base, plan, windows: np.ndarray, first: int):
    """The agreement of `base` with `plan` applied against `base`, both whole loaded models."""
    from gatenorm.validate.agreement import compare_logits

    pruned = apply_plan(copy.deepcopy(base), plan)
    ids = torch.from_numpy(windows)
    with torch.no_grad():
        want_ref = base(ids, use_cache=False).logits[:, first:-1].numpy()
        want_cand = pruned(ids, use_cache=False).logits[:, first:-1].numpy()
    return compare_logits(want_ref, want_cand, windows, first)


def assert_sequential_validation_equal(path, base, plan, plan_file, windows: np.ndarray, first: int) -> None:
    """Torch-runtime window logits of `path` and of it with `plan` (saved at `plan_file`), reference and
    candidate in one layer-at-a-time pass, give the whole models' agreement (KLD, PPL, top-1)."""
    from gatenorm.validate.agreement import compare_logits
    from gatenorm.validate.runtimes import TorchRuntime

    ref, cand = TorchRuntime(path), TorchRuntime(path, plan=plan_file)
    got = compare_logits(
        ref.window_logits(windows, first), cand.window_logits(windows, first), windows, first
    )
    assert ref._model is None and cand._model is None  # neither loaded the whole model
    want = whole_model_agreement(base, plan, windows, first)
    assert got.kld_mean == pytest.approx(want.kld_mean, rel=1e-5, abs=1e-9)
    assert got.ppl_ref == pytest.approx(want.ppl_ref, rel=1e-5)
    assert got.ppl_cand == pytest.approx(want.ppl_cand, rel=1e-5)
    assert got.top1 == want.top1
    assert want.kld_mean > 1e-4  # the plan changed the model


def test_sequential_torch_validation_equals_whole_model(family):
    """Torch-runtime validation of a plan using every action, on the engine, equals the whole model's."""
    _, folder, ckpt, base, _ = family
    plan = mixed_plan(ckpt, {1: "drop-attention", 2: "linearize", 3: "drop-block"}, {2: 0.8})
    path = folder.parent / f"{folder.name}-plan.json"
    plan.save(path)
    windows = np.random.default_rng(7).integers(3, 1000, size=(3, 12))
    assert_sequential_validation_equal(folder, base, plan, path, windows, 4)


def assert_heal_fit_equal(path, base, plan, windows: np.ndarray, settings) -> None:
    """`fit_repairs` a layer at a time on the engine fits the whole loaded model's repairs and refits
    (rel 1e-5 in Frobenius norm), and leaves the loaded model unchanged."""
    from gatenorm.heal.fit import fit_repairs
    from gatenorm.sequential import SequentialModel

    before = {k: v.clone() for k, v in base.state_dict().items()}
    old = fit_repairs(base, plan, windows, settings, batch=2)
    new = fit_repairs(SequentialModel(path), plan, windows, settings, batch=2)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert old.repairs.keys() == new.repairs.keys() and old.refits.keys() == new.refits.keys()
    assert old.repairs or old.refits
    pairs = [(new.refits[i], old.refits[i]) for i in old.refits]
    for i, repair in old.repairs.items():
        pairs.append((new.repairs[i].weight, repair.weight))
        if repair.bias is not None:
            pairs.append((new.repairs[i].bias, repair.bias))
    for got, want in pairs:
        assert float((got - want).norm() / want.norm()) < 1e-5


def test_sequential_heal_fit_equals_whole_model(family):
    """The heal fit on the engine (plan and export --heal) equals the loaded model's, in both forms, with
    every action: fitted maps, folds into the MLP below, the kept layer above refitted for the drift."""
    from gatenorm.heal.fit import HealSettings

    _, folder, ckpt, base, _ = family
    windows = np.random.default_rng(8).integers(3, 1000, size=(3, 12))
    every = mixed_plan(ckpt, {1: "drop-attention", 2: "linearize", 3: "drop-block"}, {2: 0.8})
    kept_above = mixed_plan(ckpt, {1: "drop-attention", 3: "drop-block"}, {})
    fold = not get_architecture(base.config.model_type).fold_refusal()
    forms = ["linear", "fold"] if fold else ["linear"]
    for form in forms:
        for plan in (every, kept_above):
            settings = HealSettings(form=form, bias=form == "linear" and plan is every)
            assert_heal_fit_equal(folder, base, plan, windows, settings)
