"""The validator end to end on SmolLM2: self-agreement in every runtime, PyTorch vs llama.cpp, a broken and a
pruned candidate, the CLI's exit codes and report files, and the latency benchmark."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from gatenorm.plan import Plan
from gatenorm.validate.bench import BenchConfig, run_bench
from gatenorm.validate.gates import Gates
from gatenorm.validate.run import Settings, validate
from gatenorm.validate.runtimes import BatchLogitsRuntime, model_spec, open_runtime
from gatenorm.validate.zeroshot import build_requests, load_items

# One thread: the test machine is small and shared, and llama.cpp's spinning threads suffer most from that.
QUICK = dict(threads=1, limit=4)


def run_cli(*args: str, monkeypatch) -> int:
    from gatenorm.cli import main

    monkeypatch.setattr(sys, "argv", ["gatenorm", "validate", *args, "--threads", "1"])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code


@pytest.fixture(scope="module")
def broken_hf(tmp_path_factory, smollm2_hf) -> Path:
    """SmolLM2 with the attention output of layer 0 zeroed: a broken export that still runs."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("smollm2-broken")
    for f in smollm2_hf.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    tensors = load_file(smollm2_hf / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight"].zero_()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_self_validation_llama_cpp_cli(smollm2_gguf, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    code = run_cli(
        str(smollm2_gguf), "smollm2", "--max-tokens", "512", "--tasks", "arc_easy,boolq,winogrande",
        "--limit", "4", "--json", str(out), "--md", str(tmp_path / "r.md"), monkeypatch=monkeypatch,
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    a = report["agreement"]
    assert report["candidate"]["runtime"] == report["reference"]["runtime"] == "llama.cpp"
    assert (a["n_windows"], a["n_tokens"]) == (1, 255)
    assert a["kld_mean"] == 0 and a["kld_max"] == 0 and a["top1"] == 1 and a["ppl_ratio"] == 1
    assert 5 < a["ppl_ref"] < 50
    for task in report["zeroshot"]["tasks"].values():
        assert task["reference"] == task["candidate"] and task["reference"]["n"] == 4
    assert report["passed"] and not report["failed_gates"]
    assert "PASS" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_self_validation_torch(smollm2_hf):
    spec = model_spec(str(smollm2_hf))
    assert spec.runtime == "torch"
    report = validate(spec, spec, Settings(ctx=256, max_tokens=256, tasks=["hellaswag"], **QUICK), Gates())
    a = report.agreement
    assert a.kld_mean == 0 and a.top1 == 1 and a.rms_dp == 0
    z = report.zeroshot.tasks["hellaswag"]
    assert z.reference == z.candidate
    assert report.passed


def test_ppl_pytorch_and_llama_cpp_agree(smollm2_gguf):
    """The same GGUF on the same token ids: llama.cpp (Q4_1 kernels) vs PyTorch (dequantized fp32)."""
    ref = model_spec(str(smollm2_gguf))
    cand = model_spec(str(smollm2_gguf), runtime="torch")
    report = validate(ref, cand, Settings(ctx=512, max_tokens=1024, tasks=[], **QUICK), Gates())
    a = report.agreement
    assert abs(a.ppl_cand / a.ppl_ref - 1) < 0.01
    assert a.kld_mean < 0.02 and a.top1 > 0.9


def test_tokenizers_agree(smollm2_gguf):
    """llama.cpp's GGUF tokenizer and transformers' GGUF-derived one give the same ids (no special tokens)."""
    from gatenorm.apply import load_tokenizer

    llama = open_runtime(model_spec(str(smollm2_gguf)), threads=1, n_ctx=256)
    text = "The Eiffel Tower, completed in 1889, is 330 m tall.\n\nÜber 9000 Gäste kamen."
    hf = load_tokenizer(smollm2_gguf)(text, add_special_tokens=False).input_ids
    assert llama.tokenize(text) == hf
    llama.close()


def test_broken_candidate_fails_default_gates(smollm2_hf, broken_hf, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    code = run_cli(
        str(smollm2_hf), str(broken_hf), "--max-tokens", "512", "--tasks", "none", "--json", str(out),
        monkeypatch=monkeypatch,
    )  # fmt: skip
    assert code == 1
    report = json.loads(out.read_text())
    assert not report["passed"]
    assert {"max_kld", "min_top1", "max_ppl_ratio"} <= set(report["failed_gates"])
    assert any("max_acc_drop: not evaluated" in g for g in report["gate_lines"])


def test_pruned_candidate_from_plan(smollm2_hf, smollm2_gguf, tmp_path):
    from gatenorm.methods import Method, score_checkpoint
    from gatenorm.plan import make_plan
    from gatenorm.readers import open_checkpoint

    ckpt = open_checkpoint(smollm2_hf)
    plan = make_plan(ckpt, score_checkpoint(ckpt, Method.GATE_NORM, 0), drop=2)
    plan.save(tmp_path / "plan.json")
    cand = model_spec(str(smollm2_hf), plan=tmp_path / "plan.json")
    settings = Settings(ctx=256, max_tokens=256, tasks=[], **QUICK)
    report = validate(model_spec(str(smollm2_hf)), cand, settings, Gates())
    a = report.agreement
    assert report.candidate.plan == str(tmp_path / "plan.json")
    assert 0 < a.kld_mean < 10 and a.top1 < 1
    assert Plan.load(tmp_path / "plan.json").dropped == plan.dropped


def test_bad_input_exits_2_without_report(smollm2_gguf, tiny_gguf, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.json"
    cases = [
        ([str(smollm2_gguf), str(tmp_path / "missing.gguf")], "no such file"),
        ([str(smollm2_gguf), str(tiny_gguf), "--tasks", "none"], "vocabularies differ"),
        ([str(smollm2_gguf), "smollm2", "--candidate-plan", str(tmp_path / "p.json")], "no such plan"),
        ([str(smollm2_gguf), "smollm2", "--tasks", "boolq,mmlu"], "unknown task"),
        ([str(smollm2_gguf), "smollm2", "--runtime", "tflite"], "unknown runtime"),
        ([str(smollm2_gguf), "smollm2", "--text", str(tmp_path / "none.txt")], "no such text file"),
        ([str(smollm2_gguf), "smollm2", "--max-tokens", "0", "--tasks", "none"], "nothing to validate"),
    ]
    for args, message in cases:
        assert run_cli(*args, "--json", str(out), monkeypatch=monkeypatch) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not out.exists()


def test_loglikelihood_batching_is_exact(smollm2_gguf, smollm2_hf):
    """Shared-context batching (torch) and KV-cache prefix reuse (llama.cpp) change no result."""
    items = load_items("arc_easy", 3) + load_items("winogrande", 2)
    torch_rt = open_runtime(model_spec(str(smollm2_hf)), threads=1)
    requests = build_requests(items, torch_rt.tokenize, None)
    shared = torch_rt.loglikelihoods(requests)
    padded = BatchLogitsRuntime.loglikelihoods(torch_rt, requests)
    np.testing.assert_allclose([s for s, _ in shared], [p for p, _ in padded], atol=2e-3)

    llama = open_runtime(model_spec(str(smollm2_gguf)), threads=1, n_ctx=512)
    reused = llama.loglikelihoods(requests)
    fresh = [llama.loglikelihoods([r])[0] for r in reversed(requests)][::-1]
    np.testing.assert_allclose([s for s, _ in reused], [f for f, _ in fresh], atol=2e-3)
    # llama.cpp's Q4_1 and the fp32 copy rank the choices alike
    np.testing.assert_allclose([s for s, _ in reused], [s for s, _ in shared], rtol=0.1, atol=0.5)
    llama.close()


def test_bench_interleaved(smollm2_gguf):
    spec = model_spec(str(smollm2_gguf))
    cfg = BenchConfig(prompts=[32, 64], depths=[0, 96], generate=4, runs=1, warmup=1)
    tokens = open_runtime(spec, threads=1, n_ctx=128).tokenize("The history of Paris is long. " * 20)
    b = run_bench(spec, spec, tokens, cfg, threads=1)
    for side in ("reference", "candidate"):
        m = b[side]
        assert m["pp32_tok_s"] > 0 and m["pp64_tok_s"] > 0 and m["tg4_tok_s"] > 0 and m["ttft32_ms"] > 0
        assert m["tg4_d96_tok_s"] > 0
        assert m["peak_rss_mib"] > 50 and m["file_mib"] == pytest.approx(smollm2_gguf.stat().st_size / 2**20)
        # KV bytes from llama.cpp: 30 layers x 3 KV heads x 64 x (K + V) x f16 per cached token
        per_token = 30 * 3 * 64 * 2 * 2
        assert m["kv_d96_mib"] * 2**20 == pytest.approx((96 + 4) * per_token, rel=0.02)
        assert m["kv_d0_mib"] * 2**20 == pytest.approx((1 + 4) * per_token, rel=0.2)
    assert b["ratio"]["file_mib"] == 1
    # flash attention off keeps the same K and V here (no layer dropped)
    off = b["flash_off"]
    assert off["depth"] == 96 and off["kv_mib"]["candidate"] == pytest.approx(
        b["candidate"]["kv_d96_mib"], rel=0.02
    )


@pytest.mark.slow
def test_full_default_validation(smollm2_gguf, tmp_path, monkeypatch):
    """The full default run (20k tokens, 7 tasks x 200 items, latency) of SmolLM2 against itself."""
    out = tmp_path / "r.json"
    assert run_cli(str(smollm2_gguf), "smollm2", "--bench", "--json", str(out), monkeypatch=monkeypatch) == 0
    report = json.loads(out.read_text())
    assert report["agreement"]["n_windows"] == 40 and report["agreement"]["kld_mean"] == 0
    assert len(report["zeroshot"]["tasks"]) == 7
    assert all(t["reference"] == t["candidate"] for t in report["zeroshot"]["tasks"].values())
    assert all(0.5 < r < 2 for k, r in report["bench"]["ratio"].items() if k != "peak_rss_mib")
