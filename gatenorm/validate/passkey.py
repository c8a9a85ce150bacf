"""Long-range retrieval: a random 5-digit pass key hidden at a depth in filler text (the shipped Wikipedia
leads), the model asked for it at the end; ``passkey_multi`` hides several keys, each named, and asks for
one. Scored by exact match of the greedy answer: every token of the key is the argmax after the question
(one teacher-forced pass per prompt, the same as decoding it greedily). Prompts are built from token ids
with the reference's tokenizer and a seed, so reference and candidate see identical prompts; lengths past
the models' context are clipped to it."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gatenorm.errors import GatenormError
from gatenorm.validate.result import Retrieval
from gatenorm.validate.runtimes import Request, Runtime
from gatenorm.validate.text import load_text

#: retrieval task name -> keys hidden per prompt
RETRIEVAL_TASKS = {"passkey": 1, "passkey_multi": 3}
_DOORS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
_INTRO = (
    "There is important information hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about it.\n\n"
)


class PasskeyConfig(BaseModel):
    """What the retrieval tasks measure (``--tasks passkey,passkey_multi``; recipes' validation.passkey)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    lengths: list[Annotated[int, Field(ge=64)]] = Field(
        default_factory=lambda: [1024, 2048, 4096, 8192],
        min_length=1,
        description="Prompt lengths in tokens, clipped to the models' context.",
    )
    depths: int = Field(5, ge=1, description="Depths per length, evenly from the start (0) to the end (1).")
    trials: int = Field(2, ge=1, description="Prompts per length and depth (a new key and filler each).")
    seed: int = Field(0, description="Seed of the keys and filler.")


def depth_fractions(n: int) -> list[float]:
    return [0.5] if n == 1 else [i / (n - 1) for i in range(n)]


def clip_lengths(lengths: list[int], max_context: int | None) -> list[int]:
    """`lengths` (sorted, deduplicated) with those past the context replaced by the context, less the key."""
    if max_context is None:
        return sorted(set(lengths))
    return sorted({min(n, max_context - 8) for n in lengths})


def build_prompts(
    task: str,
    cfg: PasskeyConfig,
    tokenize: Callable[[str], list[int]],
    bos_id: int | None,
    max_context: int | None,
) -> list[dict]:
    """Every prompt of `task`: {length, depth, request (context ids, key ids)}, seeded by `cfg.seed`."""
    n_keys = RETRIEVAL_TASKS[task]
    lengths = clip_lengths(cfg.lengths, max_context)
    filler = tokenize(load_text("wiki", 8 * max(lengths) + 20000))
    rng = random.Random(f"{cfg.seed}-{task}")
    intro = ([bos_id] if bos_id is not None else []) + tokenize(_INTRO)
    prompts = []
    for length in lengths:
        for depth in depth_fractions(cfg.depths):
            for _ in range(cfg.trials):
                doors = rng.sample(_DOORS, n_keys)
                keys = [str(rng.randint(10000, 99999)) for _ in doors]
                asked = rng.randrange(n_keys)
                name = (lambda d: f" of the {d} door") if n_keys > 1 else (lambda d: "")
                needles = [
                    tokenize(f" The pass key{name(d)} is {k}. Remember it. {k} is the pass key{name(d)}.\n")
                    for d, k in zip(doors, keys, strict=True)
                ]
                question = tokenize(
                    f"\n\nWhat is the pass key{name(doors[asked])}? The pass key{name(doors[asked])} is"
                )
                answer = tokenize(f" {keys[asked]}")
                room = length - len(intro) - sum(map(len, needles)) - len(question) - len(answer)
                if room < 16:
                    raise GatenormError(
                        f"passkey length {length} is too short for its prompt; use at least 256"
                    )
                start = rng.randrange(0, len(filler) - room)
                hay = filler[start : start + room]
                # the asked key at `depth`, the others at random depths
                at = [round(depth * room) if i == asked else rng.randrange(room + 1) for i in range(n_keys)]
                pieces, prev = [], 0
                for pos, i in sorted((p, i) for i, p in enumerate(at)):
                    pieces += hay[prev:pos] + needles[i]
                    prev = pos
                pieces += hay[prev:]
                prompts.append(
                    {"length": length, "depth": depth, "request": (intro + pieces + question, answer)}
                )
    return prompts


def _grid(prompts: list[dict], exact: list[bool]) -> dict:
    lengths = sorted({p["length"] for p in prompts})
    depths = sorted({p["depth"] for p in prompts})
    cells = {(p["length"], p["depth"]): [] for p in prompts}
    for p, e in zip(prompts, exact, strict=True):
        cells[(p["length"], p["depth"])].append(e)
    acc = float(np.mean(exact))
    return {
        "lengths": lengths,
        "depths": depths,
        "accuracy": [[float(np.mean(cells[(n, d)])) for d in depths] for n in lengths],
        "acc": acc,
        "acc_err": math.sqrt(acc * (1 - acc) / len(exact)),
        "n": len(exact),
    }


def evaluate_retrieval(
    ref: Runtime, cand: Runtime, work: dict[str, list[dict]], log: Callable[[str], None] = lambda _: None
) -> Retrieval:
    """Exact-match accuracy of both models per task, length and depth; the average and its drop in points."""
    tasks = {}
    for task, prompts in work.items():
        requests: list[Request] = [p["request"] for p in prompts]
        scores = [[greedy for _, greedy in rt.loglikelihoods(requests)] for rt in (ref, cand)]
        r, c = _grid(prompts, scores[0]), _grid(prompts, scores[1])
        tasks[task] = {"reference": r, "candidate": c, "drop_points": 100 * (r["acc"] - c["acc"])}
        log(
            f"{task}: exact match {100 * r['acc']:.1f} ± {100 * r['acc_err']:.1f} -> "
            f"{100 * c['acc']:.1f} ± {100 * c['acc_err']:.1f} % ({len(prompts)} prompts)"
        )
    ref_avg = float(np.mean([t["reference"]["acc"] for t in tasks.values()]))
    cand_avg = float(np.mean([t["candidate"]["acc"] for t in tasks.values()]))
    average = {"reference": ref_avg, "candidate": cand_avg, "change_points": 100 * (cand_avg - ref_avg)}
    return Retrieval.model_validate({"tasks": tasks, "average": average})


def retrieval_md(r: Retrieval) -> list[str]:
    """The report section: accuracy per task, and per length x depth for both models."""
    lines = ["## Long-range retrieval (exact match of the greedy answer, %)", ""]
    for task, t in r.tasks.items():
        ref, cand = t.reference, t.candidate
        lines += [
            f"**{task}**: reference {100 * ref.acc:.1f} ± {100 * ref.acc_err:.1f}, candidate "
            f"{100 * cand.acc:.1f} ± {100 * cand.acc_err:.1f} ({ref.n} prompts; drop "
            f"{t.drop_points:+.1f} points).",
            "",
            "| length | " + " | ".join(f"depth {d:.2f} ref / cand" for d in ref.depths) + " |",
            "|---|" + "---|" * len(ref.depths),
        ]
        for i, n in enumerate(ref.lengths):
            cells = [
                f"{100 * a:.0f} / {100 * b:.0f}"
                for a, b in zip(ref.accuracy[i], cand.accuracy[i], strict=True)
            ]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def plot_heatmaps(r: Retrieval, axes_row) -> None:
    """One heat map per task and model (accuracy by length and depth) on the given axes."""
    panels = [(task, side) for task in r.tasks for side in ("reference", "candidate")]
    for ax, (task, side) in zip(axes_row, panels, strict=True):
        g = getattr(r.tasks[task], side)
        ax.imshow(np.asarray(g.accuracy) * 100, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(g.depths)), [f"{d:.2f}" for d in g.depths])
        ax.set_yticks(range(len(g.lengths)), [str(n) for n in g.lengths])
        ax.set_xlabel("depth of the key")
        ax.set_ylabel("prompt tokens")
        ax.set_title(f"{task}, {side}: {100 * g.acc:.0f} %")
        for i, row in enumerate(g.accuracy):
            for j, a in enumerate(row):
                ax.text(j, i, f"{100 * a:.0f}", ha="center", va="center", fontsize=7)


def n_panels(r: Retrieval) -> int:
    return 2 * len(r.tasks)
