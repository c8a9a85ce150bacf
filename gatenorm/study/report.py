"""docs/study.md and its figures, from the study's results JSON only (see `gatenorm.study.run`): every table,
figure and measured sentence; the findings are hand-written regions of docs/study.md, kept as they are
(`gatenorm.study.prose`). Method names and labels come from the method registry."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from gatenorm.io import atomic_path, atomic_write_text
from gatenorm.methods import METHODS
from gatenorm.methods.calibration import SYNTHETIC
from gatenorm.plan import Plan
from gatenorm.plot import pareto_front, pyplot
from gatenorm.study.common import combo, heal_run_section
from gatenorm.study.prose import Prose


def method_label(method: str) -> str:
    """A method's label in the study's tables (`MethodSpec.label`); random's figures are a mean over seeds."""
    return METHODS[method].label + (" (mean ± sd)" if method == "random" else "")


#: The methods each target table compares a candidate with, by registry name.
COMPARED = ("gate-norm", "harp", "attention-cosine", "block-influence")
#: The study's own plans, each given its target tables.
CANDIDATES = ("mixed-synthetic", "mixed")


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties), with numpy only."""

    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
        return r

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    pyplot().close(fig)


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (speedup, KLD) not beaten by a faster-or-equal point with lower-or-equal KLD, by speedup."""
    return sorted(points[i] for i in pareto_front([(k, s) for s, k in points]))


def front_kld_at(front: list[tuple[float, float]], speedup: float) -> float | None:
    """The best KLD a method's Pareto front reaches at >= `speedup` (step interpolation: no extrapolation)."""
    ok = [k for s, k in front if s >= speedup - 1e-9]
    return min(ok) if ok else None


class Rows:
    """Per method family and budget: quality, measured and estimated speedup."""

    def __init__(self, data: dict, args, plans: dict[tuple[str, int], Plan], cost):
        self.data, self.args = data, args
        self.budgets = [int(b) for b in args.budgets.split(",")]
        self.rows: dict[str, dict[int, dict]] = {}
        speed = data.get("speed", {})
        for (name, b), plan in plans.items():
            family = "random" if name.startswith("random-") else name
            q = data.get("quality", {}).get(f"{name}/{b}")
            if q is None:
                continue
            s = speed.get(combo(plan), {}).get("ratio", {})  # measured once per action count
            entry = {
                "kld": q["kld"],
                "ppl": q["ppl"],
                "top1": q["top1"],
                "est": cost.speedup([lp.action for lp in plan.layers]),
                "pp": s.get(f"pp{args.bench_prompt}_tok_s"),
                "tg": s.get(f"tg{args.bench_gen}_tok_s"),
                "plan": plan.describe(),
            }
            self.rows.setdefault(family, {}).setdefault(b, []).append(entry)

    def value(self, family: str, b: int, key: str) -> tuple[float, float] | None:
        entries = self.rows.get(family, {}).get(b)
        if not entries or any(e[key] is None for e in entries):
            return None
        vals = np.array([e[key] for e in entries], dtype=float)
        return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0

    def points(self, family: str, key: str) -> list[tuple[float, float]]:
        out = []
        for b in self.budgets:
            s, k = self.value(family, b, key), self.value(family, b, "kld")
            if s is not None and k is not None:
                out.append((s[0], k[0]))
        return out


def fmt(v: tuple[float, float] | None, digits: int = 3, spread: bool = True) -> str:
    if v is None:
        return "–"
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}" if spread and v[1] else f"{v[0]:.{digits}f}"


def write_report(data: dict, args, ckpt, plans, cost) -> None:
    docs = Path(args.docs)
    prose = Prose(docs / "study.md")
    rows = Rows(data, args, plans, cost)
    ranks = data["rankings"]
    settings = data["settings"]
    split = settings["text_split"]
    families = [f for f in METHODS if f in rows.rows]
    md: list[str] = ["# Methods study: SmolLM2-135M", ""]
    md += [
        "Produced by `scripts/study_methods.py`: every number below comes from `docs/study_results.json`, "
        "which the script writes (rerun with the same flags to reproduce). "
        f"`python scripts/study_report.py{_report_flags(args)}` rewrites this file and its figures from "
        "that JSON alone; the hand-written regions (between `hand-written` markers) are kept as they are. "
        "Settings:",
        "",
        f"- evaluation: {settings['eval_windows']} windows x {settings['eval_len']} tokens of the shipped "
        f"Wikipedia leads (articles {split['eval_articles']}), fp32 PyTorch with `apply_plan`, "
        "PPL of the pruned model and KLD(unpruned || pruned) per token;",
        f"- calibration (data-driven methods): `wiki-heldout`, {settings['calib_samples']} x "
        f"{settings['calib_len']} tokens ({settings['harp_samples']} windows for HARP's alpha search), "
        f"articles {split['calib_articles']}: disjoint from the evaluation text (checked); mixed-synthetic: "
        f"{settings['calib_samples']} x {settings['calib_len']} tokens the model generates itself (seed 0);",
        f"- speed: llama.cpp (llama-cpp-python, {settings['threads']} threads, flash attention), the "
        "exported GGUF (Q4_1 tensors as shipped) vs the unpruned shipped GGUF, interleaved in one run, "
        f"median of {settings['bench_runs']} runs after a warm-up: prompt processing of "
        f"{settings['bench_prompt']} tokens (pp) and {settings['bench_gen']} generated tokens (tg); one "
        "measurement per distinct count of dropped / linearized / removed layers (speed depends on the "
        "counts, not on which layers), at the budgets listed in the speed table only (the benchmark is the "
        "costliest stage); 1-minute load average of the 2-core machine after each measurement: "
        f"{load_range(data)};",
        f"- cost model and data-free alpha at context {settings['ctx']}; random: seeds "
        f"0..{settings['seeds'] - 1}.",
        "",
    ]
    n_plans = sum(len(v) for f in rows.rows.values() for v in f.values())
    md += [
        f"**Coverage:** quality for {n_plans} plans; llama.cpp speed for {len(data.get('speed', {}))} "
        f"action counts; zero-shot for {len(data.get('zeroshot', {}))} models at the budgets of that table "
        "(the script resumes from its JSON: rerun it with more budgets to fill the rest).",
        "",
        *prose.block("findings"),
    ]
    for candidate in CANDIDATES:
        if candidate in rows.rows:
            if data.get("speed"):
                md += target_section(rows, families, "pp", candidate)
            md += target_section(rows, families, "est", candidate)
    md += quality_table(rows, families)
    md += timing_section(ranks)
    md += prose.block("timing")
    md += correlation_section(ranks)
    md += alpha_section(ranks, docs)
    md += zeroshot_section(data, families)
    md += prose.block("zeroshot")
    md += speed_section(data, plans, cost, args)
    md += heal_section(data, docs)
    md += prose.block("healing")
    md += prose.block("recovery")  # scripts/study_recover.py's figures (gatenorm.recover)
    md += prose.block("reading")
    mechanism_plot(ranks, docs / "study_mechanism.png")
    pareto_plot(rows, families, docs / "study_pareto.png")
    md += [
        "## Figures",
        "",
        "![KLD vs speedup](study_pareto.png)",
        "",
        "![mechanism](study_mechanism.png)",
        "",
        "![alpha](study_alpha.png)",
        "",
    ]
    prose.check_placed()
    atomic_write_text(docs / "study.md", "\n".join(md) + "\n")


def _report_flags(args) -> str:
    """The flags of this run that the report follows (the rest: the results JSON's settings, defaults)."""
    return f" --heal-compare {args.heal_compare}" if args.heal_compare else ""


def target_section(rows: Rows, families: list[str], key: str, candidate: str) -> list[str]:
    """`candidate`'s plans against the best KLD of each `COMPARED` method at >= its speedup."""
    label = {
        "pp": "measured prompt-processing speedup",
        "tg": "measured generation speedup",
        "est": "estimated speedup (cost model)",
    }[key]
    names = [METHODS[m].label for m in COMPARED]
    cosine = METHODS["attention-cosine"].label
    md = [
        f"## Target: {method_label(candidate)} vs {'; '.join(names)} at equal {label}",
        "",
        f"For each plan of `{candidate}`, the best KLD each other method's Pareto front reaches at a {label} "
        "at least as high (no extrapolation; – where none of that method's studied budgets gets as fast).",
        "",
        f"| budget | speedup | KLD | {' | '.join(names)} | KLD / {cosine} |",
        "| --- " * (4 + len(COMPARED)) + "|",
    ]
    fronts = {f: pareto(rows.points(f, key)) for f in families}
    beaten = [m for m in COMPARED if m != "attention-cosine"]
    wins = {m: [0, 0] for m in beaten}  # [wins, comparable budgets]
    within = compared = 0
    for b in rows.budgets:
        s, k = rows.value(candidate, b, key), rows.value(candidate, b, "kld")
        if s is None or k is None:
            continue
        others = {f: front_kld_at(fronts.get(f, []), s[0]) for f in COMPARED}
        for f, count in wins.items():
            if others[f] is not None:
                count[0] += k[0] < others[f]
                count[1] += 1
        cos = others["attention-cosine"]
        if cos is not None:
            compared += 1
            within += k[0] <= 1.1 * cos
        cells = ["–" if v is None else f"{v:.4f}" for v in others.values()]
        ratio = "–" if cos is None else f"{k[0] / cos:.2f}"
        md.append(f"| {b} | {s[0]:.3f} | {k[0]:.4f} | {' | '.join(cells)} | {ratio} |")
    lower = "; than ".join(f"{METHODS[m].label} at {won} of {n}" for m, (won, n) in wins.items())
    md += [
        "",
        f"`{candidate}` has a lower KLD, at comparable budgets, than {lower}. It is within 10 % of the KLD "
        f"of {cosine} at {within} of {compared}.",
        "",
    ]
    return md


def quality_table(rows: Rows, families: list[str]) -> list[str]:
    md = ["## KLD and speedup per method and budget", ""]
    head = "| method | " + " | ".join(f"{b}" for b in rows.budgets) + " |"
    md += [
        "KLD (nats/token) vs the unpruned model; random: mean ± sd over seeds.",
        "",
        head,
        "|" + " --- |" * (len(rows.budgets) + 1),
    ]
    for f in families:
        md.append(
            f"| {method_label(f)} | " + " | ".join(fmt(rows.value(f, b, "kld")) for b in rows.budgets) + " |"
        )
    md += ["", "PPL of the pruned model (unpruned: " + unpruned_ppl(rows) + ").", "", head]
    md.append("|" + " --- |" * (len(rows.budgets) + 1))
    for f in families:
        md.append(
            f"| {method_label(f)} | "
            + " | ".join(fmt(rows.value(f, b, "ppl"), 1) for b in rows.budgets)
            + " |"
        )
    for key, title in (("pp", "prompt processing"), ("tg", "generation"), ("est", "cost model (estimate)")):
        md += ["", f"Speedup, {title}:", "", head, "|" + " --- |" * (len(rows.budgets) + 1)]
        for f in families:
            md.append(
                f"| {method_label(f)} | "
                + " | ".join(fmt(rows.value(f, b, key), 3, False) for b in rows.budgets)
                + " |"
            )
    md += ["", "Plans (first seed for random):", ""]
    for f in families:
        for b in rows.budgets:
            entries = rows.rows[f].get(b)
            if entries and b in (rows.budgets[len(rows.budgets) // 2], rows.budgets[-1]):
                md.append(f"- {method_label(f)}, budget {b}: {entries[0]['plan']}")
    return [*md, ""]


def unpruned_ppl(rows: Rows) -> str:
    quality = rows.data.get("quality")
    return f"{next(iter(quality.values()))['ppl_ref']:.2f}" if quality else "–"


def timing_section(ranks: dict) -> list[str]:
    named = {n: r for n, r in ranks.items() if not n.startswith("random-")}
    secs = {n: r["scores"]["seconds"] for n, r in named.items()}
    n_layers = len(next(iter(named.values()))["scores"]["scores"])
    md = [
        "## Scoring time",
        "",
        f"Wall time of ranking all {n_layers} layers on the 2-core machine, with the 1-minute load average "
        "at the time (data-driven: loading the model with transformers, the calibration pass, the q/k "
        "content hash; mixed-synthetic also generates its text; HARP: its alpha search for the layers the "
        "largest budget linearizes). The GGUF is in the page cache.",
        "",
        f"| method | seconds | x {METHODS['gate-norm'].label} | load |",
        "| --- | --- | --- | --- |",
    ]
    base = secs.get("gate-norm")
    for n, s in sorted(secs.items(), key=lambda kv: kv[1]):
        load = named[n].get("timed_at_load")
        cells = [f"{s:.2f}", f"{s / base:.0f}" if base else "–", "–" if load is None else f"{load:.1f}"]
        md.append(f"| {METHODS[n].label} | {' | '.join(cells)} |")
    if base and "attention-cosine" in secs:
        md += [
            "",
            f"Here {METHODS['attention-cosine'].label} takes {secs['attention-cosine'] / base:.0f}x the time "
            f"of {METHODS['gate-norm'].label}.",
        ]
    return [*md, ""]


def correlation_section(ranks: dict) -> list[str]:
    cos = ranks.get("attention-cosine", {}).get("scores", {}).get("scores")
    gn = ranks.get("gate-norm", {}).get("scores", {}).get("scores")
    if cos is None or gn is None:
        return []
    md = [f"## Rank correlation with attention-cosine importance (layers 1..{len(cos) - 1})", ""]
    pairs = [(METHODS["gate-norm"].label, gn)]
    extra = ranks.get("mixed", {}).get("extra", {})
    for key, label in (
        ("alpha", "data-free alpha"),
        ("self_weight", "predicted self-attention weight"),
        ("value_gain", "value-output gain, Frobenius norm of W_o W_v G"),
    ):
        if key in extra:
            pairs.append((label, extra[key]))
    ratio = ranks["attention-cosine"]["extra"].get("attention_ratio")
    if ratio:
        pairs.append(("measured attention-output / residual norm (data)", ratio))
    synthetic = ranks.get("mixed-synthetic", {})
    if synthetic:
        own = [1 - c for c in synthetic["extra"]["attention_cosine"]]
        pairs.append(("attention-cosine on self-generated text (no data)", own))
        label = f"{METHODS['mixed-synthetic'].label}: score (damage per saved FLOP)"
        pairs.append((label, synthetic["scores"]["scores"]))
    md += ["| score | Spearman vs 1 - cos |", "| --- | --- |"]
    md += [f"| {label} | {spearman(v[1:], cos[1:]):.2f} |" for label, v in pairs]
    return [*md, ""]


def alpha_section(ranks: dict, docs: Path) -> list[str]:
    harp = ranks.get("harp", {}).get("alphas")
    free = ranks.get("harp-free", {}).get("alphas")
    if not harp or not free:
        return []
    layers = sorted(int(k) for k in harp)
    cal = [harp[str(i)] for i in layers]
    est = [free[str(i)] for i in layers]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(layers, cal, "o-", label="calibrated (HARP search)")
    ax.plot(layers, est, "s--", label="data-free (self + shared rule)")
    ax.set_xlabel("layer")
    ax.set_ylabel("alpha")
    ax.legend()
    fig.tight_layout()
    _save(fig, docs / "study_alpha.png")
    mae = float(np.mean(np.abs(np.array(cal) - np.array(est))))
    return [
        "## HARP alpha: calibrated vs data-free",
        "",
        f"Layers {layers[0]}..{layers[-1]}: mean |difference| {mae:.3f}, Spearman {spearman(cal, est):.2f}, "
        f"mean calibrated {np.mean(cal):.3f}, mean data-free {np.mean(est):.3f}.",
        "",
        "| layer | " + " | ".join(str(i) for i in layers) + " |",
        "|" + " --- |" * (len(layers) + 1),
        "| calibrated | " + " | ".join(f"{a:.2f}" for a in cal) + " |",
        "| data-free | " + " | ".join(f"{a:.2f}" for a in est) + " |",
        "",
    ]


def zeroshot_section(data: dict, families: list[str]) -> list[str]:
    z = data.get("zeroshot")
    if not z:
        return ["## Zero-shot", "", "Not measured in this run.", ""]
    base = z.get("unpruned/0", {}).get("average")
    budgets = sorted({int(k.split("/")[1]) for k in z if not k.startswith("unpruned")})
    md = [
        f"## Zero-shot average ({len(data['settings']['tasks'].split(','))} tasks)",
        "",
        f"`--limit {data['settings']['limit']}` items per task (so each average has a standard error of "
        f"several points); unpruned: {100 * base:.1f} %."
        if base is not None
        else "",
        "",
        "| method | " + " | ".join(str(b) for b in budgets) + " |",
        "|" + " --- |" * (len(budgets) + 1),
    ]
    for f in families:
        cells = []
        for b in budgets:
            vals = [
                v["average"]
                for k, v in z.items()
                if k.rsplit("/", 1)[0] in (f, *_seeds(f, z)) and k.endswith(f"/{b}")
            ]
            cells.append("–" if not vals else f"{100 * np.mean(vals):.1f}")
        md.append(f"| {method_label(f)} | " + " | ".join(cells) + " |")
    pruned = [v["average"] for k, v in z.items() if not k.startswith("unpruned")]
    n_items = len(data["settings"]["tasks"].split(",")) * data["settings"]["limit"]
    if pruned and base is not None:
        md += [
            "",
            f"The pruned models' averages span {100 * min(pruned):.1f} to {100 * max(pruned):.1f} % around "
            f"the unpruned {100 * base:.1f} %; with {n_items} items an average's standard error is about "
            f"{100 * math.sqrt(0.25 / n_items):.1f} points.",
        ]
    return [*md, ""]


def _seeds(family: str, z: dict) -> list[str]:
    if family != "random":
        return []
    return sorted({k.rsplit("/", 1)[0] for k in z if k.startswith("random-")})


def speed_section(data: dict, plans, cost, args) -> list[str]:
    speed = data.get("speed")
    if not speed:
        return ["## Measured speed", "", "Not measured in this run (estimates only).", ""]
    estimate = {combo(p): cost.speedup([lp.action for lp in p.layers]) for p in plans.values()}
    pp, tg = f"pp{args.bench_prompt}_tok_s", f"tg{args.bench_gen}_tok_s"
    md = [
        "## Measured llama.cpp speed per action count",
        "",
        "Ratios pruned / unpruned of tokens per second (median of the interleaved runs); the cost model's "
        "estimate beside them.",
        "",
        "| drop-attention / linearize / drop-block | prompt (pp) | generation (tg) | cost model "
        "| measured on |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, s in sorted(speed.items(), key=lambda kv: [int(x[1:]) for x in kv[0].split("-")]):
        d, lin, blk = (int(x[1:]) for x in key.split("-"))
        r = s["ratio"]
        md.append(f"| {d} / {lin} / {blk} | {r[pp]:.3f} | {r[tg]:.3f} | {estimate.get(key, math.nan):.3f} | "
                  f"{s['plan']} |")  # fmt: skip
    ref = next(iter(speed.values()))["reference"]
    md += [
        "",
        f"The unpruned reference in the first measured pair ran at {ref[pp]:.0f} tok/s prompt and "
        f"{ref[tg]:.1f} tok/s generation; load average during the stage {load_range(data)}. Interleaving "
        "makes both models see the same conditions; generation ratios of 32 tokens carry the most noise.",
    ]
    return [*md, ""]


def load_range(data: dict) -> str:
    """The range of load averages recorded with the speed measurements (older entries have none)."""
    loads = [s["load"] for s in data.get("speed", {}).values() if "load" in s]
    return f"{min(loads):.1f} to {max(loads):.1f}" if loads else "not recorded"


def mechanism_plot(ranks: dict, path: Path) -> None:
    cos = ranks.get("attention-cosine", {})
    ratio = cos.get("extra", {}).get("attention_ratio")
    gn = ranks.get("gate-norm", {}).get("scores", {}).get("scores")
    if not ratio or not gn:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.4))
    layers = np.arange(len(ratio))
    ax.bar(layers, ratio, color="tab:blue", label="||Attn(norm X)|| / ||X|| (calibration mean)")
    ax.set_xlabel("layer")
    ax.set_ylabel("attention-output / residual norm")
    ax2 = ax.twinx()
    ax2.plot(layers, gn, "o-", color="tab:red", label="Gate-Norm ||W_q W_k^T||_F")
    ax2.set_ylabel("Gate-Norm")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper center", fontsize=8)
    ax.set_title("How much each attention sublayer writes into the residual stream (SmolLM2-135M)")
    fig.tight_layout()
    _save(fig, path)


def pareto_plot(rows: Rows, families: list[str], path: Path) -> None:
    plt = pyplot()
    keys = [k for k in ("pp", "tg", "est") if any(rows.points(f, k) for f in families)]
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    titles = {
        "pp": "measured prompt speedup",
        "tg": "measured generation speedup",
        "est": "estimated speedup",
    }
    for ax, key in zip(axes[0], keys, strict=True):
        for i, f in enumerate(families):
            pts = rows.points(f, key)
            if not pts:
                continue
            color = f"C{i}"
            ax.scatter(*zip(*pts, strict=True), color=color, s=14)
            front = pareto(pts)
            ax.plot(*zip(*front, strict=True), "-", color=color, label=method_label(f))
        ax.set_yscale("log")
        ax.set_xlabel(titles[key])
        ax.set_ylabel("KLD vs unpruned (nats/token)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: quality vs speedup, lines = each method's Pareto front")
    fig.tight_layout()
    _save(fig, path)


def zeroshot_mean_err(entry: dict, limit: int) -> tuple[float, float]:
    """A zero-shot entry's average and its standard error (tasks independent; older entries without
    recorded errors: the binomial error of each task's accuracy over `limit` items)."""
    from gatenorm.validate.zeroshot import binomial_err

    if "average_err" in entry:
        return entry["average"], entry["average_err"]
    errs = [binomial_err(p, limit) for p in entry["tasks"].values()]
    return entry["average"], math.sqrt(sum(e * e for e in errs)) / len(errs)


def heal_rows(data: dict, section: str = heal_run_section()) -> dict[str, dict[int, dict]]:
    """Method -> budget -> healed and unhealed figures of a heal run's entries (complete ones only)."""
    heal = data.get(section, {})
    limit = data["settings"]["limit"]
    rows: dict[str, dict[int, dict]] = {}
    for key, entry in heal.items():
        if key == "calibration" or "quality" not in entry or key not in data.get("quality", {}):
            continue
        name, b = key.rsplit("/", 1)
        u = data["quality"][key]
        zs_u = data.get("zeroshot", {}).get(key)
        zs_h = entry.get("zeroshot")
        rows.setdefault(name, {})[int(b)] = {
            "healed": {**entry["quality"], "est": entry["est"]},
            "unhealed": {**u, "est": entry["est_unhealed"]},
            "zs_healed": None if zs_h is None else zeroshot_mean_err(zs_h, limit),
            "zs_unhealed": None if zs_u is None else zeroshot_mean_err(zs_u, limit),
            "fit": entry["fit_seconds"],
            "plan": entry["plan"],
        }
    return rows


def data_free(method: str, heal_calib: str) -> bool:
    """A healed plan uses no data when its method reads none and the repairs calibrate on generated text."""
    return not METHODS[method].data and heal_calib == SYNTHETIC


def heal_section(data: dict, docs: Path) -> list[str]:
    """The Healing section: healed vs unhealed per method and budget, the targets, the figure."""
    rows = heal_rows(data)
    if not rows:
        return []
    calib = data["heal"]["calibration"]
    hs = calib["settings"]
    limit = data["settings"]["limit"]
    scale = data.get("heal_scale")
    md = [
        "## Healing",
        "",
        "Every plan of the methods below, healed with `gatenorm.heal.fit.heal_plan` in form "
        f"`{hs.get('form', 'linear')}`: {_form_text(hs)}, fitted sequentially in float64 on "
        f"{hs['samples']} x {hs['length']} `{hs['calib']}` calibration tokens (seed {hs['seed']}, ridge "
        f"{hs['ridge']}{_fold_ridge(hs)}, bias {hs['bias']}, first {hs['skip_first']} position(s) of each "
        "window left out). "
        "Healed and unhealed are evaluated by the same code as the rest of the study (PyTorch fp32, "
        "`apply_plan`, the same evaluation windows of the shipped Wikipedia leads "
        f"{data['settings']['text_split']['eval_articles']}; calibration: "
        f"{_heal_text(data['settings']['text_split'].get('heal_articles'), hs['calib'])}).",
        "",
        "Speed is the cost model's estimate at context "
        f"{data['settings']['ctx']} with each fitted map's matmul counted (`cost_model(ckpt, ctx)"
        ".plan_speedup`: a mapped dropped attention costs a d x d matmul, a mapped dropped block likewise, a "
        "mapped linearized layer what the linearized one does; a fold costs nothing). The equal-speed "
        "comparisons below are at equal **estimated** speed; measured llama.cpp speed of healed GGUFs is "
        "`scripts/bench_heal.py`'s (docs/benchmarks.md).",
        "",
        f"Zero-shot: the study's {len(data['settings']['tasks'].split(','))} tasks, `--limit {limit}` items "
        "each (the same items as the zero-shot table), average ± standard error (binomial per task, tasks "
        "independent), at the study's zero-shot budgets only. Fit: seconds of `fit_repairs` for the plan "
        "(the calibration text is generated once for all plans, "
        f"{calib['seconds']:.0f} s for {calib['windows'][0]} x {calib['windows'][1]} tokens; the model "
        f"load {calib['load_seconds']:.0f} s), wall time on the shared 2-core machine under `nice 19` "
        f"(1-minute load average {calib['load']:.1f} at the generation).",
        "",
        "| method | budget | est. speedup (unhealed / healed) | KLD unhealed | KLD healed "
        "| healed / unhealed | PPL unhealed | PPL healed | top-1 unhealed | top-1 healed "
        "| zero-shot unhealed | zero-shot healed | fit s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def zs(v):
        return "–" if v is None else f"{100 * v[0]:.1f} ± {100 * v[1]:.1f}"

    for method in [m for m in METHODS if m in rows]:
        for b, r in sorted(rows[method].items()):
            u, h = r["unhealed"], r["healed"]
            ratio = h["kld"] / u["kld"]
            md.append(
                f"| {method_label(method)} | {b} | {u['est']:.3f} / {h['est']:.3f} | "
                f"{u['kld']:.4f} ± {u['kld_err']:.4f} | {h['kld']:.4f} ± {h['kld_err']:.4f} | {ratio:.2f} | "
                f"{u['ppl']:.1f} | {h['ppl']:.1f} | {u['top1']:.3f} | {h['top1']:.3f} | "
                f"{zs(r['zs_unhealed'])} | {zs(r['zs_healed'])} | {r['fit']:.1f} |"
            )
    base = data.get("zeroshot", {}).get("unpruned/0")
    asked = [
        f"{m}/{b}" for m in data["settings"]["heal_methods"].split(",")
        for b in data["settings"]["heal_budgets"].split(",")
    ]  # fmt: skip
    done = [k for k in asked if int(k.rsplit("/", 1)[1]) in rows.get(k.rsplit("/", 1)[0], {})]
    zs_done = [k for k in done if data["heal"][k].get("zeroshot")]
    md += [
        "",
        f"**Coverage:** {len(done)} of the {len(asked)} asked plans healed and evaluated"
        + (f" (missing: {', '.join(k for k in asked if k not in done)})" if len(done) < len(asked) else "")
        + f"; zero-shot of {len(zs_done)} healed plans"
        + (f" ({', '.join(zs_done)})" if zs_done else "")
        + ".",
        "",
        f"Unpruned: PPL {next(iter(data['quality'].values()))['ppl_ref']:.2f}"
        + (f", zero-shot {zs(zeroshot_mean_err(base, limit))}." if base else "."),
        "",
    ]
    named = [c for c in data["settings"].get("heal_compare", "").split(",") if c]  # this run's --heal-compare
    compared = {c: r for c in named if (r := heal_rows(data, heal_run_section(c)))}
    if compared:
        md += _compare_table(data, rows, hs["calib"], compared)
    md += ["### Targets", ""]
    # 1. healed KLD <= 0.6x unhealed at every budget >= 4, per calibration text
    for calib_name, calib_rows in {hs["calib"]: rows, **compared}.items():
        md += _ratio_target(calib_rows, calib_name)
    # 2. the best healed data-free plan vs unhealed attention-cosine at equal estimated speed
    md += _cosine_target(rows, hs["calib"])
    # 3. fit time
    fits = [r["fit"] for m in rows.values() for r in m.values()]
    total = calib["seconds"] + max(fits)
    md.append(
        f"- fitting time < 1 minute on SmolLM2: the fit {_verdict(max(fits) < 60)}: the longest plan's fit "
        f"{max(fits):.1f} s (fits {min(fits):.1f} to {max(fits):.1f} s). One plan healed from scratch "
        f"(`gatenorm plan --heal`) also generates its calibration text, {calib['seconds']:.0f} s here: "
        f"{total:.0f} s, {_verdict(total < 60)}; a recipe run, like this study, generates it once per model "
        f"and calibration for every plan it heals. Model load ({calib['load_seconds']:.0f} s) apart, niced "
        "on the shared machine."
    )
    if scale:
        md += _scale_lines(scale, hs)
    else:
        md.append("- 7B fitting time: not estimated in this run.")
    md.append(
        "- measured speed cost of the repairs (<= 2 % of the speedup they heal): `scripts/bench_heal.py` "
        "(not part of this run); the cost model's estimate is in the table (unhealed / healed speedup)."
    )
    heal_plot(rows, docs / "study_heal.png")
    md += ["", "![healed vs unhealed KLD vs estimated speedup](study_heal.png)", ""]
    return md


def _verdict(met: bool) -> str:
    return "**met**" if met else "**not met**"


def _ratio_target(rows: dict, calib: str) -> list[str]:
    """Target 1, healed KLD <= 0.6x unhealed at every budget >= 4, per method, healed on `calib`."""
    text = f"`{calib}` text" + (" (generated by the model: no data)" if calib == SYNTHETIC else "")
    lines = []
    for method in [m for m in METHODS if m in rows]:
        by_budget = rows[method]
        checked = [b for b in sorted(by_budget) if b >= 4]
        failed = [b for b in checked if by_budget[b]["healed"]["kld"] > 0.6 * by_budget[b]["unhealed"]["kld"]]
        verdict = "**met**" if checked and not failed else f"**not met** at budgets {failed}"
        lines.append(
            f"- healed KLD <= 0.6x unhealed at every budget >= 4, {method_label(method)}, healed on {text}: "
            f"{verdict} ({len(checked) - len(failed)} of {len(checked)} budgets)."
        )
    return lines


def _compare_table(data: dict, rows: dict, main: str, compared: dict[str, dict]) -> list[str]:
    """The same plans healed on each other calibration text, beside the main one's KLD."""
    split = data["settings"]["text_split"]
    md = [
        "### The same plans healed on other calibration text",
        "",
        "The same settings, fitted on "
        + "; ".join(f"`{c}`: {_heal_text(split.get(f'{heal_run_section(c)}_articles'), c)}" for c in compared)
        + ". Quality only (no zero-shot).",
        "",
        f"| method | budget | KLD unhealed | KLD healed, `{main}` | ratio | "
        + " | ".join(f"KLD healed, `{c}` | ratio | PPL healed, `{c}` | fit s" for c in compared)
        + " |",
        "| --- " * (5 + 4 * len(compared)) + "|",
    ]
    for method in [m for m in METHODS if m in rows]:
        for b, r in sorted(rows[method].items()):
            u = r["unhealed"]["kld"]
            cells = [method_label(method), str(b), f"{u:.4f}", f"{r['healed']['kld']:.4f}",
                     f"{r['healed']['kld'] / u:.2f}"]  # fmt: skip
            for other in compared.values():
                o = other.get(method, {}).get(b)
                cells += ["–"] * 4 if o is None else [
                    f"{o['healed']['kld']:.4f}", f"{o['healed']['kld'] / u:.2f}", f"{o['healed']['ppl']:.1f}",
                    f"{o['fit']:.1f}",
                ]  # fmt: skip
            md.append("| " + " | ".join(cells) + " |")
    return [*md, ""]


def _form_text(hs: dict) -> str:
    map_text = "a ridge least-squares d x d map of the layer's normed input replaces what the plan removes"
    if hs.get("form", "linear") == "linear":
        return f"per changed layer {map_text} (the attention output; a dropped block's update)"
    fold = ""
    if hs.get("drift"):
        fold = f", each fold also correcting {hs['drift']} of the gap to the unpruned model's hidden states"
        if hs.get("refit_kept"):
            fold += ", and the kept layer right above a changed one refitted for that share of the gap alone"
    if hs.get("rms_power"):
        fold += (
            f", each token of a refit weighed by 1 / rms(h)^{hs['rms_power']} (h the hidden state it adds to)"
        )
    return (
        "what a dropped attention or block adds is folded into the down projection of the MLP below it "
        f"(ReplaceMe's fold, regressed on the down projection's d_ff inputs: no run-time cost){fold}; on "
        f"linearized layers and where no MLP lies below, {map_text}"
    )


def _fold_ridge(hs: dict) -> str:
    return f", fold ridge {hs['fold_ridge']}" if hs.get("form", "linear") == "fold" else ""


def _heal_text(articles, calib: str) -> str:
    if isinstance(articles, list):
        return f"`{calib}` articles {articles}, disjoint from the evaluation articles (checked)"
    if calib == "synthetic":
        return "text the model generates itself (no text read, so disjoint from the evaluation text)"
    return f"the text file {articles} (not the shipped leads)"


def _cosine_target(rows: dict, heal_calib: str) -> list[str]:
    cos = rows.get("attention-cosine")
    free = [m for m in rows if data_free(m, heal_calib)]
    if not cos or not free:
        return ["- best healed data-free plan vs unhealed attention-cosine: not comparable in this run."]
    front = pareto([(r["healed"]["est"], r["healed"]["kld"]) for m in free for r in rows[m].values()])
    met = total = 0
    cells = []
    for b, r in sorted(cos.items()):
        s, k = r["unhealed"]["est"], r["unhealed"]["kld"]
        best = front_kld_at(front, s)
        total += 1
        met += best is not None and best <= k
        cells.append(f"budget {b} ({s:.3f}x): {k:.4f} vs {'–' if best is None else f'{best:.4f}'}")
    labels = ", ".join(method_label(m) for m in free)
    verdict = "**met**" if met == total else f"**not met** ({met} of {total})"
    return [
        f"- the best healed data-free plan ({labels}; the Pareto front of their healed plans, best KLD at an "
        f"estimated speedup at least attention-cosine's) at least matches unhealed attention-cosine at "
        f"every equal-speed budget: {verdict}; unhealed attention-cosine KLD vs best healed data-free KLD: "
        + "; ".join(cells)
        + "."
    ]


def _scale_lines(scale: dict, hs: dict) -> list[str]:
    per = scale["layer_seconds"]
    ratio = scale["gen_ratio"]
    how = (
        f"one forward of the {scale['n_layers']} layers over the tokens (the compute floor of generation)"
        + (f" times SmolLM2's measured generation / forward time ratio {ratio:.1f}" if ratio else "")
    )
    ests = "; ".join(
        f"{e['windows'][0]} x {e['windows'][1]} tokens: fit {e['fit_seconds'] / 60:.0f} min, generation "
        f"{e['gen_seconds'] / 60:.0f} min (floor {e['forward_seconds'] / 60:.0f} min)"
        for e in scale["estimates"]
    )
    return [
        f"- 7B fitting time, estimated: a stack of {scale['layers']} random llama layers of Llama-2-7B's "
        f"shape (d {scale['d_model']}, MLP {scale['ffn']}, {scale['heads']} heads; the layer order of the "
        f"stage, healed in form `{hs.get('form', 'linear')}`) run through `fit_repairs` on {scale['tokens']} "
        f"tokens ({scale['windows'][0]} x {scale['windows'][1]}) took "
        + ", ".join(f"{a} {per[a]:.0f} s" for a in scale.get("stack", per))  # the cache sorts its keys
        + f" per layer (the first includes the embedding pass). Scaled linearly in tokens (which overstates "
        f"the token-independent solve: conservative above {scale['tokens']} tokens) to "
        f"{scale['n_layers']} layers with {scale['healed']} healed (the mean of the two healed layer times, "
        "plus, for each, the extra time of the last layer, a kept layer above refitted for the drift; "
        "the kept layers are run too, as the sequential fit does), and the calibration text's generation "
        f"estimated as {how}: {ests}. Measured niced on the shared 2-core machine (load {scale['load']:.1f} "
        "after the run): an upper bound for an idle machine."
    ]


def heal_plot(rows: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, method in enumerate(m for m in METHODS if m in rows):
        pts = sorted(rows[method].items())
        color = f"C{i}"
        u = [(r["unhealed"]["est"], r["unhealed"]["kld"]) for _, r in pts]
        h = [(r["healed"]["est"], r["healed"]["kld"]) for _, r in pts]
        ax.plot(*zip(*u, strict=True), "o--", color=color, alpha=0.6, label=f"{method_label(method)}")
        ax.plot(*zip(*h, strict=True), "s-", color=color, label=f"{method_label(method)}, healed")
    ax.set_yscale("log")
    ax.set_xlabel("estimated speedup (cost model, repairs counted)")
    ax.set_ylabel("KLD vs unpruned (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("SmolLM2-135M: healed (solid) vs unhealed (dashed), budgets as points")
    fig.tight_layout()
    _save(fig, path)
