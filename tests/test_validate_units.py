"""Validator pieces that need no model: KLD statistics, zero-shot scoring and data, gates, text windows."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from gatenorm.errors import GatenormError
from gatenorm.validate.agreement import AgreementAccumulator, compare_logits
from gatenorm.validate.gates import Gates, check_gates
from gatenorm.validate.runtimes import continuation_scores
from gatenorm.validate.text import token_windows
from gatenorm.validate.zeroshot import (
    DEFAULT_TASKS,
    TASKS,
    Item,
    encode_pair,
    load_items,
    parse_tasks,
    score_items,
)


def _percentile(sorted_values: list[float], fraction: float) -> float:
    """llama-perplexity's linear interpolation between order statistics."""
    p = fraction * (len(sorted_values) - 1)
    i = int(p)
    p -= i
    return (1 - p) * sorted_values[i] + p * sorted_values[min(i + 1, len(sorted_values) - 1)]


def _direct(ref: np.ndarray, cand: np.ndarray, targets: np.ndarray) -> dict:
    """The statistics, one token at a time with plain loops."""
    kld, nll_r, nll_c, same, dp = [], [], [], [], []
    for r, c, t in zip(ref, cand, targets, strict=True):
        pr = np.exp(r - r.max()) / np.exp(r - r.max()).sum()
        pc = np.exp(c - c.max()) / np.exp(c - c.max()).sum()
        kld.append(sum(pr[i] * math.log(pr[i] / pc[i]) for i in range(len(r))))
        nll_r.append(-math.log(pr[t]))
        nll_c.append(-math.log(pc[t]))
        same.append(int(np.argmax(r)) == int(np.argmax(c)))
        dp.append(pc[t] - pr[t])
    n = len(kld)
    mean_kld = sum(kld) / n
    sd = math.sqrt(sum((k - mean_kld) ** 2 for k in kld) / n / (n - 1))
    s = sorted(kld)
    top1 = sum(same) / n
    return {
        "ppl_ref": math.exp(sum(nll_r) / n),
        "ppl_cand": math.exp(sum(nll_c) / n),
        "ppl_ratio": math.exp(sum(nll_c) / n - sum(nll_r) / n),
        "kld_mean": mean_kld,
        "kld_err": sd,
        "kld_median": (s[n // 2] + s[n // 2 - 1]) / 2 if n % 2 == 0 else s[n // 2],
        "kld_percentiles": {k: _percentile(s, f) for k, f in (("90", 0.9), ("95", 0.95), ("99", 0.99))},
        "kld_max": s[-1],
        "top1": top1,
        "top1_err": math.sqrt(top1 * (1 - top1) / (n - 1)),
        "rms_dp": math.sqrt(sum(d * d for d in dp) / n),
        "mean_dp": sum(dp) / n,
    }


def test_kld_statistics_match_direct_computation():
    rng = np.random.default_rng(0)
    n_windows, ctx, vocab, first = 3, 16, 40, 8
    windows = rng.integers(0, vocab, size=(n_windows, ctx))
    ref = [rng.normal(0, 2, size=(ctx - 1 - first, vocab)) for _ in range(n_windows)]
    cand = [r + rng.normal(0, 0.7, size=r.shape) for r in ref]
    got = compare_logits(iter(ref), iter(cand), windows, first).to_dict()
    targets = np.concatenate([w[first + 1 :] for w in windows])
    want = _direct(np.concatenate(ref), np.concatenate(cand), targets)
    assert got["n_tokens"] == n_windows * (ctx - 1 - first) and got["n_windows"] == n_windows
    for key, value in want.items():
        if key == "kld_percentiles":
            for p, v in value.items():
                assert got[key][p] == pytest.approx(v, rel=1e-9), p
        else:
            assert got[key] == pytest.approx(value, rel=1e-9), key
    assert 0 < got["top1"] < 1 and got["kld_mean"] > 0
    assert len(got["window_kld"]) == n_windows


def test_identical_logits_agree_perfectly():
    rng = np.random.default_rng(1)
    acc = AgreementAccumulator()
    for _ in range(2):
        logits = rng.normal(size=(30, 50)).astype(np.float32)
        acc.add(logits, logits.copy(), rng.integers(0, 50, 30))
    a = acc.result()
    assert a.kld_mean == 0 and a.kld_max == 0 and a.top1 == 1 and a.rms_dp == 0 and a.ppl_ratio == 1


def test_continuation_scores():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
    logprob, greedy = continuation_scores(logits, [0, 2])
    assert logprob == pytest.approx(math.log(0.5) + math.log(0.7))
    assert greedy
    assert not continuation_scores(logits, [1, 2])[1]


def test_encode_pair_moves_trailing_space_to_continuation():
    def tokenize(text: str) -> list[int]:  # one token per word, the word's leading space included
        return [hash(w) % 1000 for w in text.replace(" ", "\0 ").split("\0") if w]

    ctx, cont = encode_pair(tokenize, "Question: why? Answer: ", "because")
    assert ctx == tokenize("Question: why? Answer:")
    assert cont == tokenize(" because")


def test_score_items_acc_and_length_normalized_acc():
    items = [
        Item(("q",) * 2, (" a", " bbbbbbbb"), gold=1, lengths=(1, 8)),  # raw ll picks 0, per char picks 1
        Item(("q",) * 2, (" a", " b"), gold=0, lengths=(1, 1)),
    ]
    s = score_items(items, [-2.0, -4.0, -1.0, -3.0], "acc_norm")
    assert (s.acc, s.acc_norm, s.main, s.n) == (0.5, 1.0, 1.0, 2)


@pytest.mark.parametrize("task", list(TASKS))
def test_tasks_load_from_shipped_data(task):
    items = load_items(task, limit=5)
    assert len(items) == 5
    for item in items:
        assert 0 <= item.gold < len(item.continuations) == len(item.contexts) == len(item.lengths) >= 2
        assert all(c.strip() for c in item.contexts)
        assert all(k.startswith(" ") and k.strip() for k in item.continuations)


def test_parse_tasks():
    assert parse_tasks(",".join(DEFAULT_TASKS)) == list(DEFAULT_TASKS)
    assert parse_tasks("none") == []
    with pytest.raises(GatenormError, match="unknown task"):
        parse_tasks("boolq,mmlu")


def test_gates():
    agreement = SimpleNamespace(kld_mean=0.02, top1=0.9, ppl_ratio=1.05)
    zeroshot = SimpleNamespace(average=SimpleNamespace(drop_points=7.0))
    report = SimpleNamespace(agreement=agreement, zeroshot=zeroshot, retrieval=None)
    results = {g.name: g for g in check_gates(Gates(), report)}
    assert results["max_kld"].passed and results["min_top1"].passed and results["max_ppl_ratio"].passed
    assert results["max_acc_drop"].passed is False
    assert "FAILED" in results["max_acc_drop"].describe()
    report.zeroshot = None
    no_tasks = {g.name: g for g in check_gates(Gates(max_kld=0.01), report)}
    assert no_tasks["max_kld"].passed is False
    assert no_tasks["max_acc_drop"].passed is None


def test_token_windows(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("x" * 100)
    windows = token_windows(str(text), lambda s: list(range(len(s))), ctx=16, max_tokens=40, bos_id=7)
    assert windows.shape == (2, 16)
    assert windows[:, 0].tolist() == [7, 7] and windows[1, 1:].tolist() == list(range(17, 32))
    with pytest.raises(GatenormError, match="at least one window"):
        token_windows(str(text), lambda s: list(range(len(s))), ctx=128, max_tokens=None, bos_id=None)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(GatenormError, match="not UTF-8"):
        token_windows(str(bad), list, ctx=16, max_tokens=None, bos_id=None)


def test_zeroshot_average_has_its_standard_error():
    from gatenorm.validate.run import _mean_with_error

    scores = [
        {"metric": "acc", "main": 0.6, "acc_err": 0.03, "acc_norm_err": 9.0},
        {"metric": "acc_norm", "main": 0.4, "acc_err": 9.0, "acc_norm_err": 0.04},
    ]
    mean, err = _mean_with_error(scores)
    assert mean == pytest.approx(0.5) and err == pytest.approx(0.025)  # sqrt(0.03^2 + 0.04^2) / 2
