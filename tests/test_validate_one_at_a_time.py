"""Validation at scale: one model loaded at a time (the reference's answers recorded, then replayed against
the candidate) with the figures of both models run side by side, and a degenerate model's infinite PPL."""

from __future__ import annotations

import math

import numpy as np
import pytest

from exporters.export import export
from gatenorm.plan import make_plan
from gatenorm.validate import recorded
from gatenorm.validate.agreement import AgreementAccumulator, compare_logits
from gatenorm.validate.passkey import PasskeyConfig
from gatenorm.validate.run import Settings, validate
from gatenorm.validate.runtimes import LlamaCppRuntime, model_spec, open_runtime
from gatenorm.validate.text import token_windows
from gatenorm.validate.zeroshot import build_requests, evaluate_task, load_items


@pytest.fixture(scope="module")
def pruned_smollm2(smollm2_scored, tmp_path_factory):
    """SmolLM2 with 4 attention sublayers dropped, as a GGUF."""
    ckpt, scores = smollm2_scored
    out = tmp_path_factory.mktemp("pruned") / "smollm2-4.gguf"
    return export(ckpt, make_plan(ckpt, scores, drop=4), out)


def test_llama_cpp_validation_holds_one_model_and_keeps_the_figures(
    smollm2_gguf, pruned_smollm2, monkeypatch
):
    """Never two llama.cpp models at once (the candidate's limits are read first, then the reference runs
    and is freed, then the candidate), the logits going through a file; KLD, top-1, PPL and the task
    scores equal those of both models run side by side."""
    live: set[int] = set()
    most = [0]
    init, close = LlamaCppRuntime.__init__, LlamaCppRuntime.close

    def counted_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        live.add(id(self))
        most[0] = max(most[0], len(live))

    def counted_close(self):
        live.discard(id(self))
        close(self)

    monkeypatch.setattr(LlamaCppRuntime, "__init__", counted_init)
    monkeypatch.setattr(LlamaCppRuntime, "close", counted_close)
    monkeypatch.setattr(recorded, "MEMORY_BYTES", 1)  # the logits go to the temporary file
    settings = Settings(
        ctx=128,
        max_tokens=512,
        tasks=["arc_easy", "passkey"],
        limit=3,
        threads=1,
        passkey=PasskeyConfig(lengths=[256], depths=1, trials=1),
    )
    ref_spec, cand_spec = model_spec(str(smollm2_gguf)), model_spec(str(pruned_smollm2))
    report = validate(ref_spec, cand_spec, settings)
    assert most[0] == 1 and not live
    assert report.retrieval.tasks["passkey"].reference.n == 1

    ref, cand = (open_runtime(spec, 1, 1024) for spec in (ref_spec, cand_spec))  # side by side
    try:
        first = settings.ctx // 2
        windows = token_windows(settings.text, ref.tokenize, settings.ctx, settings.max_tokens, ref.bos_id)
        direct = compare_logits(
            ref.window_logits(windows, first), cand.window_logits(windows, first), windows, first
        )
        items = load_items("arc_easy", settings.limit)
        requests = build_requests(items, ref.tokenize, ref.bos_id)
        scores = [evaluate_task(rt, items, requests, "arc_easy") for rt in (ref, cand)]
    finally:
        ref.close()
        cand.close()
    assert direct.n_windows == 4 and direct.kld_mean > 0
    assert report.agreement == direct
    task = report.zeroshot.tasks["arc_easy"]
    assert [task.reference, task.candidate] == scores


def test_degenerate_model_has_infinite_perplexity():
    """A candidate that gives the text a log-probability past float range has PPL inf (shown as inf), not an
    OverflowError; the reference's figures stay finite."""
    acc = AgreementAccumulator()
    ref = np.zeros((3, 4), dtype=np.float32)  # uniform: PPL 4
    cand = np.zeros((3, 4), dtype=np.float32)
    cand[:, 1] = -1000.0  # the target token, at a log-probability of about -1000
    acc.add(ref, cand, np.array([1, 1, 1]))
    result = acc.result()
    assert result.ppl_ref == pytest.approx(4.0) and result.ppl_cand == math.inf == result.ppl_ratio
    assert result.ppl_cand_err == 0.0  # three tokens: no error estimate (as llama.cpp)
    assert f"{result.ppl_ratio:.4f}" == "inf" and math.isfinite(result.kld_mean)


def test_torch_validation_reads_each_layer_once(smollm2_gguf, smollm2_scored, tmp_path, monkeypatch):
    """Two PyTorch models (the source and its plan) share one layer-at-a-time pass: the candidate is open
    while the reference records, so the engine runs once for both; the figures are those of a pass each."""
    from gatenorm.sequential import SequentialModel

    passes: list[int] = []
    forward_many = SequentialModel.forward_many

    def counted(self, windows, plans, *args, **kwargs):
        passes.append(len(plans))
        return forward_many(self, windows, plans, *args, **kwargs)

    ckpt, scores = smollm2_scored
    path = tmp_path / "plan.json"
    make_plan(ckpt, scores, drop=4).save(path)
    settings = Settings(ctx=64, max_tokens=192, tasks=[], threads=1)
    ref_spec = model_spec(str(smollm2_gguf), "torch")
    cand_spec = model_spec(str(smollm2_gguf), "torch", path)
    monkeypatch.setattr(SequentialModel, "forward_many", counted)
    report = validate(ref_spec, cand_spec, settings)
    assert passes == [2]  # one pass, serving both models

    first = settings.ctx // 2
    logits = []
    for spec in (ref_spec, cand_spec):  # one at a time: a pass each
        rt = open_runtime(spec, 1, 1024)
        try:
            windows = token_windows(settings.text, rt.tokenize, settings.ctx, settings.max_tokens, rt.bos_id)
            logits.append(list(rt.window_logits(windows, first)))
        finally:
            rt.close()
    assert passes == [2, 1, 1]
    apart = compare_logits(*logits, windows, first)
    assert report.agreement.kld_mean == pytest.approx(apart.kld_mean, rel=1e-6) and apart.kld_mean > 0
    assert report.agreement.top1 == apart.top1


def test_llama_cpp_loads_the_weights_without_a_repacked_copy(smollm2_gguf, monkeypatch):
    """llama.cpp's repacked copy of the weights (its CPU "extra" buffers: as large as a Q4_K file, beside the
    mapped file) is off for validation and for sampling synthetic text; llama-cpp-python's default is left
    as it was."""
    import llama_cpp

    from gatenorm.methods import synthetic

    runtime = LlamaCppRuntime(smollm2_gguf, threads=1, n_ctx=64)
    try:
        assert runtime.llm.model_params.use_extra_bufts is False
    finally:
        runtime.close()
    assert llama_cpp.llama_model_default_params().use_extra_bufts is True
    seen: list[bool] = []
    load = llama_cpp.llama_model_load_from_file

    def loaded(path, params):
        seen.append(params.use_extra_bufts)
        return load(path, params)

    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", loaded)
    _, kv_bytes = synthetic._gguf_facts(smollm2_gguf)
    synthetic.llama_windows(smollm2_gguf, np.array([[5], [6]]), 4, 0, kv_bytes)
    assert seen == [False]


def test_llama_cpp_times_as_users_run_it_and_validates_without_the_repacked_copy(smollm2_gguf, monkeypatch):
    """Quality runs load a GGUF without llama.cpp's repacked copy of its weights (about the file's size
    resident); timings load it as stock llama.cpp does, repacked, for the speed users get."""
    import llama_cpp.llama as high

    seen = []
    init = high.Llama.__init__

    def spy(self, *args, **kwargs):
        seen.append(high.llama_cpp.llama_model_default_params().use_extra_bufts)
        init(self, *args, **kwargs)

    monkeypatch.setattr(high.Llama, "__init__", spy)
    for timing in (False, True):
        open_runtime(model_spec(smollm2_gguf), n_ctx=64, timing=timing).close()
    assert seen == [False, True]
    assert high.llama_cpp.llama_model_default_params().use_extra_bufts  # stock again after the load
