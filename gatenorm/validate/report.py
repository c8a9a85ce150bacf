"""The validation report: JSON (everything), Markdown (for people) and a PNG (per-window KLD, accuracies)."""

from __future__ import annotations

from pathlib import Path

from gatenorm.io import atomic_path, atomic_write_text
from gatenorm.validate.agreement import Agreement
from gatenorm.validate.result import Bench, ModelInfo, ValidationReport, Zeroshot


def _pm(value: float, err: float, scale: float = 1.0, digits: int = 4) -> str:
    return f"{value * scale:.{digits}f} ± {err * scale:.{digits}f}"


def _agreement_md(a: Agreement) -> list[str]:
    rows = [
        ("tokens scored (windows)", f"{a.n_tokens} ({a.n_windows})"),
        ("PPL reference", _pm(a.ppl_ref, a.ppl_ref_err)),
        ("PPL candidate", _pm(a.ppl_cand, a.ppl_cand_err)),
        ("PPL ratio cand/ref", _pm(a.ppl_ratio, a.ppl_ratio_err)),
        ("Mean KLD", _pm(a.kld_mean, a.kld_err, digits=6)),
        ("Median KLD", f"{a.kld_median:.6f}"),
        *((f"{k}% KLD", f"{v:.6f}") for k, v in a.kld_percentiles.items()),
        ("Maximum KLD", f"{a.kld_max:.6f}"),
        ("Same top p", _pm(a.top1, a.top1_err, 100, 3) + " %"),
        ("RMS Δp", _pm(a.rms_dp, a.rms_dp_err, 100, 3) + " %"),
    ]
    return [
        "## Output agreement",
        "",
        "| statistic | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
    ]


def _zeroshot_md(z: Zeroshot) -> list[str]:
    lines = [
        "## Zero-shot accuracy (%)",
        "",
        "| task | n | metric | ref acc | cand acc | ref acc_norm | cand acc_norm | drop (points) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, t in z.tasks.items():
        r, c = t.reference, t.candidate
        lines.append(
            f"| {task} | {r.n} | {r.metric} | {100 * r.acc:.1f} | {100 * c.acc:.1f} | "
            f"{100 * r.acc_norm:.1f} | {100 * c.acc_norm:.1f} | {t.drop_points:+.1f} |"
        )
    avg = z.average
    ref, cand = (avg.percent(side) for side in ("reference", "candidate"))
    lines.append(f"| **average** | | headline | {ref} | {cand} | | | {avg.drop_points:+.1f} |")
    return lines


def _bench_md(b: Bench) -> list[str]:
    lines = [
        "## Latency (median of runs)",
        "",
        "| metric | reference | candidate | cand/ref |",
        "|---|---|---|---|",
    ]
    for k, r in b.reference.items():
        lines.append(f"| {k} | {r:.4g} | {b.candidate[k]:.4g} | {b.ratio[k]:.3f} |")
    cfg = b.config
    flash = "flash attention on" if cfg.get("flash_attn", True) else "flash attention off"
    lines += [
        "",
        f"{cfg['runs']} interleaved runs after {cfg['warmup']} warm-up, {cfg['threads']} threads, {flash} "
        f"(llama.cpp). tgN_dD: N tokens decoded after a D-token context; kv_dD: KV-cache MiB the runtime "
        "holds then.",
    ]
    if off := b.flash_off:
        on, no = off["kv_mib_flash_on"], off["kv_mib"]
        lines += [
            "",
            f"KV cache at depth {off['depth']} (llama.cpp), flash attention on -> off: reference "
            f"{on['reference']:.1f} -> {no['reference']:.1f} MiB, candidate {on['candidate']:.1f} -> "
            f"{no['candidate']:.1f} MiB (off - on: {no['candidate'] - on['candidate']:+.1f} MiB).",
        ]
    return lines


def _model_md(model: ModelInfo) -> str:
    plan = f", plan `{model.plan}`" if model.plan else ""
    return f"`{model.path}` ({model.runtime}{plan})"


def to_markdown(report: ValidationReport) -> str:
    """The report as Markdown: verdict and gates first, then each measured section."""
    ref, cand = report.reference, report.candidate
    verdict = "PASS" if report.passed else "FAIL"
    lines = [
        f"# gatenorm validate: {verdict}",
        "",
        f"- reference: {_model_md(ref)}",
        f"- candidate: {_model_md(cand)}",
        "",
        "## Gates",
        "",
        *(f"- {g}" for g in report.gate_lines),
        "",
    ]
    if report.agreement:
        lines += [*_agreement_md(report.agreement), ""]
    if report.zeroshot:
        lines += [*_zeroshot_md(report.zeroshot), ""]
    if report.retrieval:
        from gatenorm.validate.passkey import retrieval_md

        lines += retrieval_md(report.retrieval)
    if report.bench:
        lines += [*_bench_md(report.bench), ""]
    cpu = report.cpu_seconds
    secs = ", ".join(f"{k} {v:.1f} s (CPU {cpu.get(k, 0):.1f} s)" for k, v in report.seconds.items())
    lines += [f"Time: {secs}.", ""]
    return "\n".join(lines)


def write_markdown(report: ValidationReport, path: Path) -> None:
    atomic_write_text(path, to_markdown(report))


def write_png(report: ValidationReport, path: Path) -> None:
    """Per-window mean KLD and the accuracy per task of both models, side by side."""
    from gatenorm.plot import pyplot
    from gatenorm.validate.passkey import n_panels, plot_heatmaps

    plt = pyplot()

    panels = [k for k in ("agreement", "zeroshot") if getattr(report, k)]
    heat = n_panels(report.retrieval) if report.retrieval else 0
    if not panels and not heat:
        return
    rows, cols = (1 + bool(panels) if heat else 1), max(len(panels), heat, 1)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), dpi=100, squeeze=False)
    used = ([len(panels)] if panels else []) + ([heat] if heat else [])  # axes used per row
    for row, n in zip(axes, used, strict=True):
        for ax in row[n:]:
            ax.set_axis_off()
    if heat:  # the retrieval heat maps: accuracy by prompt length and depth of the key
        plot_heatmaps(report.retrieval, axes[-1][:heat])
    for ax, panel in zip(axes[0], panels, strict=False):
        if panel == "agreement":
            kld = report.agreement.window_kld
            ax.bar(range(len(kld)), kld, color="tab:blue")
            ax.axhline(report.agreement.kld_mean, color="k", lw=1, ls="--", label="mean")
            ax.set_xlabel("window")
            ax.set_ylabel("mean KLD")
            ax.set_title("KL divergence per window")
            ax.legend()
        else:
            tasks = list(report.zeroshot.tasks.items())
            xs = range(len(tasks))
            ref = [100 * t.reference.main for _, t in tasks]
            cand = [100 * t.candidate.main for _, t in tasks]
            ax.bar([x - 0.2 for x in xs], ref, width=0.4, label="reference")
            ax.bar([x + 0.2 for x in xs], cand, width=0.4, label="candidate")
            ax.set_xticks(list(xs), [name for name, _ in tasks], rotation=30, ha="right")
            ax.set_ylabel("accuracy (%)")
            ax.set_title("Zero-shot accuracy (headline metric)")
            ax.legend()
    fig.suptitle(f"gatenorm validate: {'PASS' if report.passed else 'FAIL'}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
