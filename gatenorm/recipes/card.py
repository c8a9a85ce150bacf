"""The model card (``README.md``) beside each artifact: what it is, how to run it, how well it does."""

from __future__ import annotations

from pathlib import Path

from exporters.targets import target_spec
from gatenorm import __version__
from gatenorm.plan import Plan
from gatenorm.recipes.batch import Variant
from gatenorm.validate.metrics import METRICS
from gatenorm.validate.result import ValidationReport


def source_info(path: Path) -> dict[str, str]:
    """License and organization of a source GGUF from its ``general.*`` keys (empty for a folder)."""
    if not path.is_file():
        return {}
    from exporters.gguf.header import ScannedGGUF

    fields = ScannedGGUF(path).fields
    keys = {"license": "general.license", "organization": "general.organization"}
    return {k: str(fields[v].contents()) for k, v in keys.items() if v in fields}


def model_title(path: Path) -> str:
    """The source model's name as its author spelled it: the GGUF file name without its quant suffix
    (``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct``), or the HF folder's name.

    A GGUF's ``general.name`` is no good here: llama.cpp's converter derives it from the repository name
    and title-cases it (``Smollm2 135M 8k Lc100K Mix1 Ep2``)."""
    from exporters.gguf.quantize import parse_quant
    from gatenorm.errors import GatenormError

    stem = path.name.removesuffix(".gguf")
    base, _, suffix = stem.rpartition(".")
    try:
        parse_quant(suffix)
    except GatenormError:
        return stem
    return base or stem


def _front_matter(variant: Variant, info: dict[str, str]) -> list[str]:
    tags = ["gatenorm", "pruned", "attention-pruning", variant.export.target]
    lines = ["---"]
    if "license" in info:
        lines.append(f"license: {info['license']}")
    lines += ["tags:", *(f"- {t}" for t in tags)]
    lines += target_spec(variant.export.target).card_front_matter
    return [*lines, "---", ""]


def _quality_rows(report: ValidationReport) -> list[str]:
    """One row per metric with a card row (`gatenorm.validate.metrics`) that was measured, then the speeds."""
    rows = []
    for metric in METRICS.values():
        if metric.card is not None and (section := getattr(report, metric.section)) is not None:
            rows.append("| {} | {} |".format(*metric.card(section)))
    if b := report.bench:
        for k, v in b.candidate.items():
            if k.endswith("tok_s"):
                rows.append(
                    f"| {k.replace('_tok_s', '')} tokens/s (x source) | {v:.1f} (x{b.ratio[k]:.2f}) |"
                )
    return rows


def healing_text(plan: Plan) -> str | None:
    """Which layers of a healed plan carry fitted repairs and what they were fitted on (None: unhealed)."""
    h = plan.healing
    if h is None:
        return None
    calib = {"synthetic": "text the model generated itself (no data)", "wiki-heldout": "wiki-heldout text"}
    source = calib.get(h.calib, f"the calibration file with sha256 {h.calib.removeprefix('file:')}")
    parts = []
    if plan.repaired:
        parts.append(f"layers {plan.repaired} apply a fitted d x d linear repair of what they lost")
    if plan.refitted:
        parts.append(
            f"the MLP down projections of layers {plan.refitted} are refitted to add what the changed "
            "layers above them lost (a fold: no extra run-time cost)"
        )
    fit = "sequential" if h.sequential else "independent"
    return (
        f"healed: {'; '.join(parts)} (ridge least squares, {h.ridges()}, {fit} fit) on {h.samples} x "
        f"{h.length} tokens of {source}"
    )


def model_card(variant: Variant, report: ValidationReport | None) -> str:
    """A README.md that can be published beside the artifact as is."""
    plan = variant.load_plan()
    src = Path(variant.source_path)
    info = source_info(src)
    title = model_title(src)
    n = plan.source.n_layers
    what = (
        f"{plan.budget} of its {n} layers changed ({plan.describe()})"
        if plan.budget
        else f"no layer changed (the unpruned baseline of this batch, {n} layers)"
    )
    changed = f"{plan.budget} of {n} layers pruned" if plan.budget else "unpruned baseline"
    method = f", ranked by **{plan.method}**" if plan.budget else ""
    artifact = Path(variant.artifact).relative_to(variant.folder).as_posix()
    lines = [
        *_front_matter(variant, info),
        f"# {title}: {variant.export.target.upper()} {variant.export.quant}, {changed}",
        "",
        f"`{artifact}` is {variant.model} ({src.name}) with {what}{method}, exported to "
        f"{variant.export.target.upper()} ({variant.export.quant}) by gatenorm {__version__}. A layer whose "
        "attention is removed computes `h + mlp(norm(h))`, a linearized one `h + W norm(h)` (one matmul) "
        "before its MLP, a removed block nothing; none of them keeps a KV cache, so prefill and decode are "
        "faster and the KV cache is smaller.",
        "",
        *([f"Healing: {text}.", ""] if (text := healing_text(plan)) else []),
        "## Use",
        "",
        target_spec(variant.export.target).usage(artifact),
        "",
    ]
    if report is not None:
        ref = report.reference.runtime
        lines += [
            "## Quality and speed",
            "",
            f"Measured by `gatenorm validate` in {report.candidate.runtime} against the unpruned "
            f"source run in {ref}, on the same tokens "
            f"({'passes' if report.passed else 'FAILS'} its gates; full report in `validation.md`).",
            "",
            "| measure | value |",
            "|---|---|",
            *_quality_rows(report),
            "",
        ]
    lines += [
        "## Provenance",
        "",
        f"- source: `{src.name}`, sha256 `{variant.source_sha256}`",
        f"- plan: method `{plan.method}`, {plan.describe()}; the plan JSON travels inside the model file "
        "(`gatenorm.plan`)",
        *([f"- healing: {text}"] if text else []),
        f"- build key: `{variant.key}` (source content, plan, export settings, tool version)",
        f"- made with gatenorm {__version__}: Gate-Norm attention-sublayer pruning "
        "(Saikumar & Varghese, arXiv 2512.20636)",
        "",
    ]
    return "\n".join(lines)
