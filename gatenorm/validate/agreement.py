"""Output agreement of two models on the same token windows: the statistics of llama-perplexity
``--kl-divergence`` (PPL, PPL ratio, KL divergence, top-1 agreement, RMS Δp), computed window by window so
that only one window's logits are ever held."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
from pydantic import BaseModel, Field

KLD_PERCENTILES = (90.0, 95.0, 99.0, 99.9)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_stats(
    ref_logits: np.ndarray, cand_logits: np.ndarray, targets: np.ndarray
) -> dict[str, np.ndarray]:
    """Per position of [n, vocab] logits: NLL of the target under each model, KL(ref || cand), whether the
    top tokens agree, and Δp = p_cand(target) - p_ref(target)."""
    lr = log_softmax(ref_logits)
    lc = log_softmax(cand_logits)
    idx = np.arange(len(targets))
    nll_ref = -lr[idx, targets]
    nll_cand = -lc[idx, targets]
    kld = (np.exp(lr) * (lr - lc)).sum(axis=-1)
    return {
        "nll_ref": nll_ref,
        "nll_cand": nll_cand,
        "kld": np.maximum(kld, 0.0),  # exact 0 for identical logits; rounding can give -1e-17
        "same_top": ref_logits.argmax(axis=-1) == cand_logits.argmax(axis=-1),
        "p_diff": np.exp(-nll_cand) - np.exp(-nll_ref),
    }


def mean_and_error(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error, sqrt(var / (n - 1)); the error is 0 for 10 values or fewer (llama.cpp)."""
    n = len(values)
    mean = float(values.mean())
    var = float((values.astype(np.float64) ** 2).mean() - mean * mean)
    return mean, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


class Agreement(BaseModel):
    """Agreement statistics of a candidate against a reference (probabilities as fractions, not %)."""

    n_tokens: int
    n_windows: int
    ppl_ref: float
    ppl_ref_err: float
    ppl_cand: float
    ppl_cand_err: float
    ppl_ratio: float
    ppl_ratio_err: float
    kld_mean: float
    kld_err: float
    kld_median: float
    kld_percentiles: dict[str, float]
    kld_max: float
    top1: float
    top1_err: float
    rms_dp: float
    rms_dp_err: float
    mean_dp: float
    window_kld: list[float] = Field(default_factory=list)

    def to_dict(self) -> dict:
        return self.model_dump()


def exp_with_error(log_value: float, log_error: float) -> tuple[float, float]:
    """exp of a mean log and its error (delta method): infinite past float range (a degenerate model's
    perplexity), with an infinite error unless the log's error is 0."""
    try:
        value = math.exp(log_value)
    except OverflowError:
        return math.inf, math.inf if log_error else 0.0
    return value, value * log_error


class AgreementAccumulator:
    """Collects per-token statistics window by window; `result()` summarizes them."""

    def __init__(self) -> None:
        self._parts: dict[str, list[np.ndarray]] = {}
        self.window_kld: list[float] = []

    def add(self, ref_logits: np.ndarray, cand_logits: np.ndarray, targets: np.ndarray) -> None:
        if ref_logits.shape != cand_logits.shape:
            raise ValueError(f"logits shapes differ: {ref_logits.shape} vs {cand_logits.shape}")
        stats = token_stats(ref_logits, cand_logits, np.asarray(targets))
        for key, value in stats.items():
            self._parts.setdefault(key, []).append(value)
        self.window_kld.append(float(stats["kld"].mean()))

    def result(self) -> Agreement:
        if not self._parts:
            raise ValueError("no windows were scored")
        v = {k: np.concatenate(parts) for k, parts in self._parts.items()}
        n = len(v["kld"])
        log_ref, log_ref_err = mean_and_error(v["nll_ref"])
        log_cand, log_cand_err = mean_and_error(v["nll_cand"])
        log_ratio, log_ratio_err = mean_and_error(v["nll_cand"] - v["nll_ref"])
        kld_mean, kld_err = mean_and_error(v["kld"])
        top1 = float(v["same_top"].mean())
        mse, mse_err = mean_and_error(v["p_diff"] ** 2)
        rms = math.sqrt(mse)
        ppl_ref, ppl_ref_err = exp_with_error(log_ref, log_ref_err)
        ppl_cand, ppl_cand_err = exp_with_error(log_cand, log_cand_err)
        ppl_ratio, ppl_ratio_err = exp_with_error(log_ratio, log_ratio_err)
        return Agreement(
            n_tokens=n,
            n_windows=len(self.window_kld),
            ppl_ref=ppl_ref,
            ppl_ref_err=ppl_ref_err,
            ppl_cand=ppl_cand,
            ppl_cand_err=ppl_cand_err,
            ppl_ratio=ppl_ratio,
            ppl_ratio_err=ppl_ratio_err,
            kld_mean=kld_mean,
            kld_err=kld_err,
            kld_median=float(np.median(v["kld"])),
            kld_percentiles={f"{p:g}": float(np.percentile(v["kld"], p)) for p in KLD_PERCENTILES},
            kld_max=float(v["kld"].max()),
            top1=top1,
            top1_err=math.sqrt(top1 * (1 - top1) / (n - 1)) if n > 1 else 0.0,
            rms_dp=rms,
            rms_dp_err=0.5 / rms * mse_err if rms > 0 else 0.0,
            mean_dp=float(v["p_diff"].mean()),
            window_kld=self.window_kld,
        )


def compare_logits(
    ref_windows: Iterable[np.ndarray],
    cand_windows: Iterable[np.ndarray],
    windows: np.ndarray,
    first: int,
    log: Callable[[str], None] | None = None,
) -> Agreement:
    """Agreement over `windows` [n, T], given each model's logits at positions first..T-2 per window."""
    acc = AgreementAccumulator()
    for i, (row, ref, cand) in enumerate(zip(windows, ref_windows, cand_windows, strict=True)):
        acc.add(ref, cand, row[first + 1 :])
        if log is not None and (i + 1) % 10 == 0:
            log(f"agreement: {i + 1}/{len(windows)} windows, mean KLD so far {np.mean(acc.window_kld):.4f}")
    return acc.result()
