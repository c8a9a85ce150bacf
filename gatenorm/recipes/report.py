"""The batch's REPORT.md (comparison table and plots) and manifest.json (every file's sha256 and size, the
plans, the recipe), both made from what is on disk, so a rerun that skipped everything reports the same."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from gatenorm import __version__
from gatenorm.io import atomic_write_text, file_sha256
from gatenorm.recipes.batch import BatchPlan, Variant
from gatenorm.recipes.build import BUILD_RECORD, VariantResult, read_record, read_report
from gatenorm.recipes.card import healing_text
from gatenorm.recipes.plots import plot_layer_scores, plot_quality, plot_speed_quality
from gatenorm.validate.metrics import METRICS, Metric
from gatenorm.validate.result import Bench

REPORT, MANIFEST, PLOTS = "REPORT.md", "manifest.json", "plots"
_METHOD = (
    "Each variant is validated against its unpruned source model: GGUF variants in llama.cpp against the "
    "source in llama.cpp, ONNX variants in onnxruntime against the source in PyTorch, so KLD and PPL include "
    "the quantization of the export. Speedup: the variant's speed over that of the 0-dropped variant of the "
    "same export (each measured interleaved with the source). Each variant's folder holds its model card "
    "(README.md) and its full validation report (validation.md)."
)


def _bench_key(bench: Bench, prefix: str) -> str | None:
    """The bench metric 'pp' (the first prompt length) or 'tg' (decoding after an empty context)."""
    from gatenorm.validate.bench import pp_key, tg_key

    cfg = bench.config
    key = pp_key(cfg["prompts"][0]) if prefix == "pp" else tg_key(cfg["generate"], 0)
    return key if key in bench.candidate else None


def _columns() -> list[Metric]:
    """The metrics with a REPORT.md column, in registry order."""
    return [m for m in METRICS.values() if m.column is not None]


def _row(out: Path, variant: Variant) -> dict:
    """The measured figures of one variant (None where not measured): one per metric with a column (by its
    name), the reference's PPL and zero-shot average, the verdict, the size and the speeds."""
    record = read_record(out / variant.folder) or {}
    size = sum(f["size"] for f in record.get("files", {}).values()) or None
    report = read_report(out / variant.folder)
    a, z, b = (getattr(report, k, None) for k in ("agreement", "zeroshot", "bench"))
    row = {
        "size_mib": size / 2**20 if size else None,
        **{m.name: m.value(report) for m in _columns()},
        "ppl_ref": a.ppl_ref if a else None,
        "zeroshot_ref": z.average.reference if z else None,
        "passed": report.passed if report else None,
        "failed_gates": report.failed_gates if report else [],
    }
    for prefix in ("pp", "tg"):
        key = _bench_key(b, prefix) if b else None
        row[f"{prefix}_tok_s"] = b.candidate[key] if key else None
        row[f"{prefix}_ratio"] = b.ratio[key] if key else None
    return row


def _speedups(plan: BatchPlan, rows: dict[str, dict]) -> None:
    """Speedup of each variant over the 0-dropped variant of the same model and export: the ratio of their
    (variant / reference) speed ratios, each measured interleaved with the same reference, so machine
    load mostly cancels. Without such a baseline: the speed ratio to the reference."""
    base = {(v.model, v.export.label): v.name for v in plan.variants if v.budget == 0}
    for v in plan.variants:
        row, ref = rows[v.name], rows.get(base.get((v.model, v.export.label), ""), {})
        for prefix in ("pp", "tg"):
            mine, theirs = row[f"{prefix}_ratio"], ref.get(f"{prefix}_ratio")
            row[f"speedup_{prefix}"] = mine / theirs if mine and theirs else mine


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


def _status(result: VariantResult | None, row: dict) -> str:
    if result is not None and not result.ok:
        return f"**FAILED** ({result.failed_step})"
    if row["passed"] is None:
        return "built" if result is None or result.steps.get("validate") != "skipped" else "skipped"
    return "pass" if row["passed"] else "gates: " + ", ".join(row["failed_gates"])


def _table(plan: BatchPlan, rows: dict[str, dict], results: dict[str, VariantResult]) -> list[str]:
    columns = _columns()
    heads = ["variant", "method", "dropped", "export", "size MiB", *(m.column for m in columns)]
    heads += ["pp tok/s", "tg tok/s", "pp speedup", "tg speedup", "verdict"]
    lines = [
        "| " + " | ".join(heads) + " |",
        "|---|---|---:|---|" + "---:|" * (len(columns) + 5) + "---|",
    ]
    for v in plan.variants:
        r = rows[v.name]
        dropped = f"{v.budget} ({v.target})" if v.target else str(v.budget)
        cells = [
            f"[{v.name}]({v.folder}/README.md)",
            v.method or "–",
            dropped,
            v.export.label,
            _fmt(r["size_mib"], ".1f"),
            *(_fmt(r[m.name], m.fmt, m.scale) for m in columns),
            _fmt(r["pp_tok_s"], ".0f"),
            _fmt(r["tg_tok_s"], ".1f"),
            _fmt(r["speedup_pp"], ".2f"),
            _fmt(r["speedup_tg"], ".2f"),
            _status(results.get(v.name), r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _plot_points(plan: BatchPlan, rows: dict[str, dict]) -> list[dict]:
    """One point per (variant, series); the 0-dropped baseline belongs to every method's series."""
    methods = defaultdict(set)
    for v in plan.variants:
        if v.method:
            methods[v.model].add(v.method)
    points = []
    for v in plan.variants:
        for method in [v.method] if v.method else sorted(methods[v.model]) or ["unpruned"]:
            points.append(
                {"series": f"{v.model} {method} {v.export.label}", "dropped": v.budget, **rows[v.name]}
            )
    return points


def _score_plots(plan: BatchPlan, out: Path) -> list[str]:
    by_model: dict[str, dict[str, tuple[list[float], dict[int, int]]]] = defaultdict(dict)
    for v in sorted(plan.variants, key=lambda v: v.budget):
        if not v.method:
            continue
        p = v.load_plan()
        scores, first = by_model[v.model].get(v.method, (p.scores, {}))
        for layer in p.changed:
            first.setdefault(layer, v.budget)
        by_model[v.model][v.method] = (scores, first)
    names = []
    for model, methods in by_model.items():
        name = f"{PLOTS}/scores-{model}.png"
        plot_layer_scores(model, methods, out / name)
        names.append(name)
    return names


def write_report(
    plan: BatchPlan, out: Path, results: dict[str, VariantResult], recipe_path: Path
) -> dict[str, dict]:
    """Write REPORT.md and its PNGs; return the figures of each variant."""
    rows = {v.name: _row(out, v) for v in plan.variants}
    _speedups(plan, rows)
    points = _plot_points(plan, rows)
    plots = _score_plots(plan, out)
    plot_quality(points, out / PLOTS / "quality-vs-dropped.png")
    plot_speed_quality(points, out / PLOTS / "speed-vs-quality.png")
    plots += [f"{PLOTS}/quality-vs-dropped.png", f"{PLOTS}/speed-vs-quality.png"]
    from gatenorm.recipes.frontier import frontier_md, frontier_points, plot_frontier

    frontier = frontier_points(plan, out)
    if frontier:
        plot_frontier(frontier, out / PLOTS / "frontier.png")
        plots.append(f"{PLOTS}/frontier.png")
    refs = {(v.model, v.export.target): rows[v.name] for v in plan.variants if rows[v.name]["ppl_ref"]}
    lines = [
        f"# {plan.recipe_name}: {len(plan.variants)} variants",
        "",
        f"Recipe `{recipe_path}`, gatenorm {__version__}. {_METHOD}",
        "",
        *_table(plan, rows, results),
        "",
        *frontier_md(frontier),
    ]
    for (model, target), r in refs.items():
        z = f", zero-shot average {100 * r['zeroshot_ref']:.1f} %" if r["zeroshot_ref"] is not None else ""
        lines.append(f"- source {model} as reference for {target}: PPL {r['ppl_ref']:.3f}{z}")
    failed = [r for r in results.values() if not r.ok]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- `{r.name}` ({r.failed_step}): {r.error}" for r in failed]
    healed = {v.name: text for v in plan.variants if v.healed and (text := healing_text(v.load_plan()))}
    if healed:
        lines += ["", "## Healed variants", ""]
        lines += [f"- `{name}`: {text}" for name, text in healed.items()]
    resolved = {k: v for k, v in plan.budgets.items() if any(not b.isdigit() for b in v)}
    if resolved:
        lines += ["", "## Target budgets", ""]
        for key, budgets in resolved.items():
            lines += [f"- {key}: {b} -> {n} layers" for b, n in budgets.items() if not b.isdigit()]
    lines += ["", "## Plots", "", *(f"![{Path(p).stem}]({p})" for p in plots), ""]
    atomic_write_text(out / REPORT, "\n".join(lines))
    return rows


def _known_hashes(out: Path, plan: BatchPlan) -> dict[str, dict]:
    """sha256 of artifact files recorded at build time, reusable while size and mtime are unchanged."""
    known = {}
    for v in plan.variants:
        known.update((read_record(out / v.folder) or {}).get("files", {}))
    return known


def write_manifest(
    plan: BatchPlan, out: Path, results: dict[str, VariantResult], recipe_text: str, recipe_dump: dict
) -> None:
    """manifest.json: the recipe, every variant with its plan and status, and every file's sha256 and size."""
    known = _known_hashes(out, plan)
    files = {}
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = f.relative_to(out).as_posix()
        if rel == MANIFEST or any(part.startswith(".") for part in Path(rel).parts):
            continue
        st = f.stat()
        old = known.get(rel)
        fresh = old and old["size"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns
        files[rel] = {"size": st.st_size, "sha256": old["sha256"] if fresh else file_sha256(f)}
    variants = []
    for v in plan.variants:
        r = results.get(v.name)
        variants.append(
            {
                "name": v.name,
                "artifact": v.artifact,
                "model": v.model,
                "method": v.method,
                "budget": v.budget,
                "target": v.target,
                "export": v.export.model_dump(),
                "key": v.key,
                "validation_key": v.validation.key if v.validation else None,
                "status": "failed" if r and not r.ok else "ok",
                "error": r.error if r else None,
                "steps": r.steps if r else {},
                "plan": json.loads(v.plan),
            }
        )
    doc = {
        "gatenorm_version": __version__,
        "recipe": {"text": recipe_text, "parsed": recipe_dump},
        "budgets": plan.budgets,
        "variants": variants,
        "build_record": BUILD_RECORD,
        "files": files,
    }
    atomic_write_text(out / MANIFEST, json.dumps(doc, indent=2) + "\n")
