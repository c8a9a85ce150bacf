"""Recovery on SmolLM2 (docs/study.md "Recovery"): the study's plans of `--methods` at `--budgets` (made from
the rankings in docs/study_results.json), unhealed / healed / healed + recovered (`gatenorm.recover`), KLD
and PPL on the study's evaluation windows (the shipped Wikipedia leads, `gatenorm.study.run.eval_windows`;
healing and recovery train on text the model generates itself, so the two are disjoint), with the
recovery's time and the machine's load. `--curve N` also evaluates the merged weights every N steps (the
KLD-against-steps curve; its evaluation time is not counted in the recovery's). Results go to `--out`
(resumed: a plan x settings already there is not run again); a markdown table is printed.

    python scripts/study_recover.py --budgets 8,12 [--methods mixed-synthetic] [--recover '{"steps": 150}']
                                    [--heal '{"samples": 8}'] [--eval-windows 2] [--curve 25] [--threads 2]

The defaults (every setting at `RecoverySettings()` and `HealSettings()`, the study's 8 evaluation windows)
are the measurement docs/study.md asks for.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from gatenorm.apply import apply_plan, load_model, load_tokenizer, set_overrides
from gatenorm.heal.fit import HealSettings, heal_plan
from gatenorm.io import atomic_write_text
from gatenorm.methods import MethodOptions, make_method_plan
from gatenorm.models import resolve_model
from gatenorm.readers import open_checkpoint
from gatenorm.recover.settings import RecoverySettings
from gatenorm.recover.train import recover_plan
from gatenorm.study.run import eval_windows, logits_of, quality_of, ranking_from_cache
from gatenorm.validate.text import windows_sha256


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="mixed-synthetic")
    p.add_argument("--budgets", default="8,12")
    p.add_argument("--recover", default="{}", help="RecoverySettings fields as JSON")
    p.add_argument("--heal", default="{}", help="HealSettings fields as JSON")
    p.add_argument("--eval-windows", type=int, default=None, help="default: the study's")
    p.add_argument("--curve", type=int, default=0, help="evaluate every N steps too (0: at the end only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--study", type=Path, default=Path("docs/study_results.json"))
    p.add_argument("--out", type=Path, default=Path("docs/study_recover.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    study = json.loads(args.study.read_text())
    n_eval = args.eval_windows or study["settings"]["eval_windows"]
    ev = argparse.Namespace(eval_windows=n_eval, eval_len=study["settings"]["eval_len"])
    ctx = study["settings"]["ctx"]
    path = resolve_model("smollm2")
    ckpt = open_checkpoint(path)
    settings = RecoverySettings.model_validate_json(args.recover)
    heal = HealSettings.model_validate_json(args.heal)
    stamp = settings.model_dump(mode="json") | {"heal": heal.model_dump(mode="json"), "evals": n_eval}
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    base = load_model(path)
    windows = eval_windows(ev, load_tokenizer(path))
    measured_on = windows_sha256(windows)
    ref = logits_of(base, windows)
    start = time.perf_counter()
    calib = heal.windows(path)
    text = (settings.calib, settings.samples, settings.length, settings.seed)
    same = text == (heal.calib, heal.samples, heal.length, heal.seed)
    train_text = calib if same else settings.windows(path)  # one text when the settings agree
    print(
        f"calibration: {calib.shape} {heal.calib} tokens in {time.perf_counter() - start:.0f} s", flush=True
    )
    folder = args.out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        ranking = ranking_from_cache(study["rankings"][method])
        for b in (int(x) for x in args.budgets.split(",")):
            key = f"{method}/{b}"
            runs = results.setdefault(key, {"runs": []})
            if any(r["settings"] == stamp for r in runs["runs"]):
                continue
            plan = make_method_plan(ckpt, method, b, options=MethodOptions(ctx=ctx), ranking=ranking)
            if runs.get("eval_windows_sha256") != measured_on:  # other windows: measured again
                runs.update(eval_windows=n_eval, eval_windows_sha256=measured_on, runs=[])
                runs.pop("unhealed", None)
                runs.pop("healed", None)
            if "unhealed" not in runs:
                runs["unhealed"] = quality_of(apply_plan(copy.deepcopy(base), plan), windows, ref)
            healed = heal_plan(
                path, plan, heal, folder / f"{method}-{b}.repairs.safetensors", model=base, windows=calib
            )
            healed_model = apply_plan(copy.deepcopy(base), healed)
            if runs.get("heal") != heal.model_dump(mode="json"):
                runs["heal"] = heal.model_dump(mode="json")
                runs.pop("healed", None)
            if "healed" not in runs:
                runs["healed"] = quality_of(healed_model, windows, ref) | {
                    "fit_seconds": healed.healing.seconds
                }
            curve, probe_seconds = [], [0.0]

            def probe(
                step: int, merged: dict, healed_model=healed_model, curve=curve, key=key, spent=probe_seconds
            ) -> None:
                t = time.perf_counter()
                model = copy.deepcopy(healed_model)
                set_overrides(model, merged)
                q = quality_of(model, windows, ref)
                curve.append({"step": step, "kld": q["kld"], "ppl": q["ppl"]})
                print(f"  {key} step {step}: KLD {q['kld']:.4f} PPL {q['ppl']:.2f}", flush=True)
                spent[0] += time.perf_counter() - t

            stem = folder / f"{method}-{b}-{len(runs['runs'])}"
            load = os.getloadavg()[0]
            recovered = recover_plan(
                path,
                healed,
                settings,
                stem.with_suffix(".recovered.safetensors"),
                print,
                None,
                base,
                train_text,
                (args.curve, probe) if args.curve else None,
            )
            recovered.save(stem.with_suffix(".json"))
            q = quality_of(apply_plan(copy.deepcopy(base), recovered), windows, ref)
            r = recovered.recovery
            curve.append({"step": r.steps, "kld": q["kld"], "ppl": q["ppl"]})
            runs["runs"].append(
                {
                    "settings": stamp,
                    "quality": q,
                    "seconds": r.seconds - probe_seconds[0],
                    "load_before": load,
                    "load_after": os.getloadavg()[0],
                    "layers": r.layers,
                    "tensors": len(r.tensors),
                    "initial_loss": r.initial_loss,
                    "loss": r.loss,
                    "curve": curve,
                }
            )
            atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
            h, u = runs["healed"], runs["unhealed"]
            print(
                f"{key}: KLD {u['kld']:.4f} unhealed, {h['kld']:.4f} healed, {q['kld']:.4f} recovered "
                f"({q['kld'] / h['kld']:.2f}x healed) in {runs['runs'][-1]['seconds']:.0f} s",
                flush=True,
            )
    print(table(results))


def table(results: dict) -> str:
    """The markdown table of every plan x recovery run in `results`."""
    lines = [
        "| plan | recovery | KLD unhealed | KLD healed | KLD recovered | recovered / healed | PPL unhealed | "
        "PPL healed | PPL recovered | recovery s (load) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, runs in results.items():
        u, h = runs["unhealed"], runs["healed"]
        for r in runs["runs"]:
            s, q = r["settings"], r["quality"]
            what = (
                f"{s['steps']} x {s['batch']}, rank {s['rank']}, {s['layers']}, {s['calib']} x {s['samples']}"
            )
            cells = [
                key,
                what,
                u["kld"],
                h["kld"],
                q["kld"],
                q["kld"] / h["kld"],
                u["ppl"],
                h["ppl"],
                q["ppl"],
            ]
            cells.append(f"{r['seconds']:.0f} ({r['load_before']:.1f})")
            lines.append("| " + " | ".join(c if isinstance(c, str) else f"{c:.3g}" for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
