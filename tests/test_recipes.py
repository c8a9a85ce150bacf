"""Recipes (`gatenorm run`): schema errors with line numbers, the batch plan, skip on rerun, failure
isolation, byte-identical reruns, kill -9 safety, a real SmolLM2 batch end to end, and the Ray executor."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gatenorm.errors import GatenormError
from gatenorm.recipes.loader import load_recipe
from gatenorm.recipes.plots import pareto_front

TINY = """\
name: tiny-batch
models:
  - tiny
budgets: [0, 1]
exports:
  gguf:
    quants: [keep, Q8_0]
validation:
  ctx: 32
  max_tokens: 64
  tasks: []
  bench: null
"""


def gatenorm(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gatenorm.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def artifacts(out: Path) -> dict[str, str]:
    """sha256 of every exported model file (GGUF files, ONNX folders' files), by relative path."""
    files = [p for p in out.rglob("*") if p.is_file() and (p.suffix == ".gguf" or "onnx" in p.parent.name)]
    return {p.relative_to(out).as_posix(): sha(p) for p in sorted(files)}


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# --- schema

SCHEMA_ERRORS = {
    "unknown key": (
        TINY.replace("    quants:", "    quant: [F16]\n    quants:"),
        ":7: exports.gguf.quant: unknown key",
    ),
    "top-level typo": (TINY + "budget: [3]\n", ":13: budget: unknown key"),
    "wrong type": (
        TINY.replace("ctx: 32", "ctx: big"),
        ":9: validation.ctx: Input should be a valid integer",
    ),
    "negative budget": (
        TINY.replace("[0, 1]", "[0, -1]"),
        ":4: budgets[1]: Input should be greater than or equal",
    ),
    "bad target": (TINY.replace("[0, 1]", "[0, {max_kld: 0.1, min_top1: 0.5}]"), ":4: budgets[1]: a target"),
    "unknown quant": (TINY.replace("Q8_0", "Q9_9"), ":7: exports.gguf.quants[1]: unknown quant 'Q9_9'"),
    "unknown method": (
        TINY + "methods: [gate-norm, magic]\n",
        ":13: methods[1].name: unknown method 'magic'",
    ),
    "unknown task": (
        TINY.replace("tasks: []", "tasks: [boolq, trivia]"),
        ":11: validation.tasks: unknown task",
    ),
    "missing exports": (TINY.split("exports:")[0], ":1: exports: required key missing"),
    "not yaml": ("models: [tiny\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_ERRORS))
def test_schema_errors_name_key_and_line(tmp_path, case):
    text, expected = SCHEMA_ERRORS[case]
    recipe = write(tmp_path / "r.yaml", text)
    with pytest.raises(GatenormError) as e:
        load_recipe(recipe)
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cli_errors_are_one_line_exit_2_before_any_work(tmp_path):
    out = tmp_path / "out"
    bad_key = write(tmp_path / "a.yaml", TINY + "jobz: 2\n")
    too_many = write(tmp_path / "b.yaml", TINY.replace("[0, 1]", "[0, 2]"))  # tiny has 2 layers
    too_fast = write(tmp_path / "c.yaml", TINY.replace("[0, 1]", "[0, {min_speedup: 3}]"))
    for recipe, message in (
        (bad_key, "a.yaml:13: jobz: unknown key"),
        (too_many, "budget 2 out of range"),
        (
            too_fast,
            "budget min_speedup=3 of tiny: estimated speedup 3.0 is out of reach: gate-norm reaches at most",
        ),
    ):
        result = gatenorm("run", recipe, "-o", out)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr
        assert lines[-1].startswith("gatenorm: error: ") and message in lines[-1], result.stderr
        assert "Traceback" not in result.stderr
        assert not out.exists()


def test_dry_run_prints_the_batch_plan_and_builds_nothing(tmp_path):
    recipe = write(
        tmp_path / "r.yaml",
        TINY.replace("[0, 1]", "[0, 1, {min_speedup: 1.01}]") + "methods: [gate-norm, last]\n",
    )
    out = tmp_path / "out"
    result = gatenorm("run", recipe, "-o", out, "--dry-run")
    assert result.returncode == 0, result.stderr
    # budget 0 is one shared baseline; the speedup target resolves to 1 layer, the same as budget 1
    names = [
        "tiny-d00-gguf-keep",
        "tiny-d00-gguf-Q8_0",
        "tiny-gate-norm-d01-gguf-keep",
        "tiny-gate-norm-d01-gguf-Q8_0",
        "tiny-last-d01-gguf-keep",
        "tiny-last-d01-gguf-Q8_0",
    ]
    for name in names:
        assert name in result.stdout
    assert "6 variants" in result.stdout and result.stdout.count(" build ") == 6
    assert "min_speedup=1.01 -> 1 layers" in result.stdout
    assert not out.exists()


def test_pareto_front():
    points = [(0.0, 1.0), (0.5, 1.3), (0.4, 1.1), (0.6, 1.2), (1.0, 1.5), (0.2, 0.9)]
    assert pareto_front(points) == [0, 2, 1, 4]


# --- runs


def test_rerun_skips_unchanged_and_rebuilds_only_what_changed(tmp_path):
    recipe = write(tmp_path / "r.yaml", TINY)
    out = tmp_path / "out"
    first = gatenorm("run", recipe, "-o", out)
    assert first.returncode == 0, first.stderr
    assert "4 variants" in first.stderr and "12 built" in first.stderr
    built = artifacts(out)
    assert len(built) == 4
    mtimes = {p: (out / p).stat().st_mtime_ns for p in built}
    umask = os.umask(0)
    os.umask(umask)
    assert {(out / p).stat().st_mode & 0o777 for p in built} == {0o666 & ~umask}  # not mkstemp's 0600
    doc = manifest(out)
    for rel, entry in doc["files"].items():
        assert entry == {"size": (out / rel).stat().st_size, "sha256": sha(out / rel)}, rel
    assert {v["name"] for v in doc["variants"]} == {Path(p).parent.name for p in built}
    assert all(v["plan"]["source"]["n_layers"] == 2 for v in doc["variants"])
    report = (out / "REPORT.md").read_text()
    assert report.count("| [tiny-") == 4 and "plots/speed-vs-quality.png" in report
    for png in ("scores-tiny", "quality-vs-dropped", "speed-vs-quality"):
        assert (out / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"

    again = gatenorm("run", recipe, "-o", out)
    assert again.returncode == 0, again.stderr
    assert "8 skipped" in again.stderr and "4 built" in again.stderr  # the cards are always rewritten
    assert {p: (out / p).stat().st_mtime_ns for p in built} == mtimes

    # a new quant builds only its variants; a new validation setting re-validates without re-exporting
    write(recipe, TINY.replace("[keep, Q8_0]", "[keep, F16]").replace("max_tokens: 64", "max_tokens: 96"))
    changed = gatenorm("run", recipe, "-o", out)
    assert changed.returncode == 0, changed.stderr
    assert "tiny-d00-gguf-F16: export built" in changed.stderr
    assert "tiny-d00-gguf-keep: export skipped" in changed.stderr
    assert "tiny-d00-gguf-keep: validate built" in changed.stderr
    assert (out / "tiny-d00-gguf-keep/tiny-d00-gguf-keep.gguf").stat().st_mtime_ns == mtimes[
        "tiny-d00-gguf-keep/tiny-d00-gguf-keep.gguf"
    ]
    report = json.loads((out / "tiny-d00-gguf-keep/validation.json").read_text())
    assert report["agreement"]["n_tokens"] == 3 * 15  # 96 tokens: 3 windows of 32, second halves scored


def test_one_failed_variant_does_not_stop_the_others(tmp_path, tokenizer_dir):
    # harp-free linearizes the last layer (3) of a qwen2 model, whose v/o biases deci linear attention
    # cannot add: the GGUF export of the 1-layer plan is refused; budget 0 still builds
    from tests.conftest import tiny_hf

    folder = tiny_hf(tmp_path / "qwen2", tokenizer_dir, "qwen2")
    text = TINY.replace("  - tiny\n", f"  - path: {folder}\n    name: q\n").replace("[keep, Q8_0]", "[keep]")
    text += "methods: [harp-free]\n"
    out = tmp_path / "out"
    result = gatenorm("run", write(tmp_path / "r.yaml", text), "-o", out)
    assert result.returncode == 1, result.stderr
    assert "1 failed" in result.stderr
    stderr = " ".join(result.stderr.split())  # rich wraps long lines
    assert "FAILED q-harp-free-d01-gguf-keep (export): cannot linearize layers [3]" in stderr
    assert (out / "q-d00-gguf-keep/q-d00-gguf-keep.gguf").is_file()
    assert (out / "q-d00-gguf-keep/validation.json").is_file()
    assert not (out / "q-harp-free-d01-gguf-keep/q-harp-free-d01-gguf-keep.gguf").exists()
    assert "## Failures" in (out / "REPORT.md").read_text()
    status = {v["name"]: (v["status"], v["error"]) for v in manifest(out)["variants"]}
    assert status["q-d00-gguf-keep"] == ("ok", None)
    assert status["q-harp-free-d01-gguf-keep"][0] == "failed"
    assert "Traceback" in (out / "logs/q-harp-free-d01-gguf-keep.log").read_text()


def test_two_runs_give_byte_identical_artifacts(tmp_path):
    recipe = write(tmp_path / "r.yaml", TINY.replace("validation:", "validation:\n  enabled: false"))
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        result = gatenorm("run", recipe, "-o", out)
        assert result.returncode == 0, result.stderr
    first, second = (artifacts(out) for out in outs)
    assert len(first) == 4 and first == second
    cards = [(out / "tiny-d00-gguf-Q8_0/README.md").read_text() for out in outs]
    assert cards[0] == cards[1]


def test_onnx_export_is_byte_identical(tmp_path, tiny_llama_dir):
    from exporters.export import export, open_model
    from gatenorm.methods import score_checkpoint
    from gatenorm.plan import make_plan

    ckpt = open_model(tiny_llama_dir)
    plan = make_plan(ckpt, score_checkpoint(ckpt, "gate-norm"), 1)
    for name in ("a", "b"):
        export(tiny_llama_dir, plan, tmp_path / name, "onnx", "int8")
    files = sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert "onnx/model_quantized.onnx" in files and "genai_config.json" in files
    for name in files:
        assert sha(tmp_path / "a" / name) == sha(tmp_path / "b" / name), name


def _complete_gguf(path: Path) -> bool:
    from exporters.gguf.header import ScannedGGUF

    try:
        ScannedGGUF(path)  # refuses a GGUF whose tensor data ends past the end of the file
    except GatenormError:
        return False
    return True


def test_kill_9_leaves_no_truncated_artifact_and_the_rerun_finishes(tmp_path, smollm2_gguf):
    text = f"""\
models: [{smollm2_gguf}]
budgets: [0, 4, 8]
exports:
  gguf:
    quants: [F16, Q8_0]
validation:
  enabled: false
"""
    recipe = write(tmp_path / "r.yaml", text)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatenorm.cli", "run", recipe, "-o", out],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not list(out.glob("*/build.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.4)  # well into the next export
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)  # the worker gets SIGKILL from its parent's death
    done = {p.parent.name for p in out.glob("*/build.json")}
    assert 1 <= len(done) < 6
    for gguf_file in out.glob("*/*.gguf"):  # only complete files carry a final name
        assert _complete_gguf(gguf_file), gguf_file
    rerun = gatenorm("run", recipe, "-o", out)
    assert rerun.returncode == 0, rerun.stderr
    for name in done:
        assert f"{name}: export skipped" in rerun.stderr
    assert len(list(out.glob("*/build.json"))) == 6
    assert not [p for p in out.rglob(".*") if p.name.endswith((".tmp", ".old"))]
    for gguf_file in out.glob("*/*.gguf"):
        assert _complete_gguf(gguf_file), gguf_file


def test_smollm2_recipe_end_to_end(tmp_path, smollm2_gguf):
    """A real, small batch: SmolLM2 dropping 0 and 4 attention sublayers, Q8_0 GGUF, validated in llama.cpp
    (a short text, a few ARC-Easy items, one latency run); the rerun skips everything."""
    text = f"""\
name: smollm2-test
models: [{smollm2_gguf}]
budgets: [0, 4]
exports:
  gguf:
    quants: [Q8_0]
validation:
  ctx: 128
  max_tokens: 256
  tasks: [arc_easy]
  limit: 4
  bench:
    runs: 1
    warmup: 0
    prompts: [128, 256]
    depths: [0]
    generate: 8
"""
    recipe = write(tmp_path / "r.yaml", text)
    out = tmp_path / "out"
    result = gatenorm("run", recipe, "-o", out)
    assert result.returncode == 0, result.stderr
    base = "SmolLM2-135M-Instruct.Q4_1-d00-gguf-Q8_0"
    pruned = "SmolLM2-135M-Instruct.Q4_1-gate-norm-d04-gguf-Q8_0"
    for name in (base, pruned):
        report = json.loads((out / name / "validation.json").read_text())
        assert report["candidate"]["runtime"] == "llama.cpp" and report["reference"]["runtime"] == "llama.cpp"
        assert report["reference"]["path"] == str(smollm2_gguf.resolve())
        assert report["zeroshot"]["tasks"]["arc_easy"]["candidate"]["n"] == 4
        assert report["bench"]["candidate"]["tg8_tok_s"] > 0
        card = (out / name / "README.md").read_text()
        assert card.startswith("---\nlicense: apache-2.0\n") and f"{name}.gguf" in card
        title = "# SmolLM2-135M-Instruct: GGUF Q8_0, " + (
            "4 of 30 layers pruned" if "d04" in name else "unpruned baseline"
        )
        assert title + "\n" in card
        assert "zero-shot average (arc_easy) |" in card and " ± " in card.split("zero-shot average")[1]
    base_report = json.loads((out / base / "validation.json").read_text())
    pruned_report = json.loads((out / pruned / "validation.json").read_text())
    assert base_report["agreement"]["kld_mean"] < pruned_report["agreement"]["kld_mean"]
    table = [line for line in (out / "REPORT.md").read_text().splitlines() if line.startswith("| [")]
    assert len(table) == 2
    assert table[0].split("|")[-3].strip() == "1.00"  # tg speedup of the baseline over itself
    assert "| gate-norm | 4 | gguf-Q8_0 |" in table[1]
    files = manifest(out)["files"]
    gguf_rel = f"{pruned}/{pruned}.gguf"
    assert files[gguf_rel]["sha256"] == sha(out / gguf_rel)

    start = time.perf_counter()
    again = gatenorm("run", recipe, "-o", out)
    assert again.returncode == 0, again.stderr
    assert "4 skipped" in again.stderr, again.stderr
    assert time.perf_counter() - start < 120


def test_ray_executor_builds_the_same_artifacts(tmp_path):
    pytest.importorskip("ray")
    recipe = write(tmp_path / "r.yaml", TINY)
    local, distributed = tmp_path / "local", tmp_path / "ray"
    assert gatenorm("run", recipe, "-o", local).returncode == 0
    result = gatenorm("run", recipe, "-o", distributed, "--executor", "ray")
    assert result.returncode == 0, result.stderr
    assert "12 built" in result.stderr
    assert artifacts(local) == artifacts(distributed)
    assert (distributed / "tiny-gate-norm-d01-gguf-Q8_0/validation.json").is_file()


def test_recipe_methods_make_their_own_plans(tmp_path, tiny_llama_dir, monkeypatch):
    from gatenorm.plan import Plan
    from gatenorm.recipes.batch import plan_batch

    text = TINY.replace("  - tiny\n", f"  - path: {tiny_llama_dir}\n    name: t\n").replace("[0, 1]", "[2]")
    recipe = write(tmp_path / "r.yaml", text + "methods: [mixed, harp-free, gate-norm]\n")
    batch = plan_batch(load_recipe(recipe)[0], "r")
    plans = {v.name: Plan.from_json(v.plan) for v in batch.variants if v.name.endswith("-keep")}
    assert {p.method for p in plans.values()} == {"mixed", "harp-free", "gate-norm"}
    harp = next(p for p in plans.values() if p.method == "harp-free")
    assert len(harp.linearized) == 2 and all(lp.alpha is not None for lp in harp.layers if lp.alpha)
    gate = next(p for p in plans.values() if p.method == "gate-norm")
    assert len(gate.dropped) == 2 and not gate.linearized
    bad = write(tmp_path / "b.yaml", text + "methods: [{name: mixed, options: {alpha: 1}}]\n")
    with pytest.raises(GatenormError, match="takes no option"):
        plan_batch(load_recipe(bad)[0], "b")
    # speedup_for reaches the method: mixed prices its actions for decode at depth ctx
    from gatenorm.methods import data_free

    asked = []
    real = data_free.saved_flops
    monkeypatch.setattr(
        data_free, "saved_flops", lambda c, ctx, phase: asked.append((ctx, phase)) or real(c, ctx, phase)
    )
    decode = write(
        tmp_path / "d.yaml", text + "methods: [{name: mixed, options: {ctx: 64, speedup_for: decode}}]\n"
    )
    plan_batch(load_recipe(decode)[0], "d")
    assert asked == [(64, "decode")]


def test_plans_are_reused_by_content_key(tmp_path, tiny_llama_dir, monkeypatch):
    """A rerun with the same inputs takes every model x method's plans from the cache without scoring;
    a changed budget or method option, or a dry run's missing store, scores again."""
    from gatenorm.recipes import batch

    text = TINY.replace("  - tiny\n", f"  - path: {tiny_llama_dir}\n    name: t\n")
    recipe = load_recipe(write(tmp_path / "r.yaml", text + "methods: [gate-norm, harp-free]\n"))[0]
    cache = tmp_path / "plans"
    assert batch.plan_batch(recipe, "r", cache=cache, store=False) and not cache.exists()
    first = batch.plan_batch(recipe, "r", cache=cache)
    assert len(list(cache.glob("*.json"))) == 2
    calls = []
    real_rank = batch.rank_with
    monkeypatch.setattr(
        batch, "rank_with", lambda ckpt, method: calls.append(method.name) or real_rank(ckpt, method)
    )
    assert batch.plan_batch(recipe, "r", cache=cache) == first and calls == []
    changed = load_recipe(
        write(
            tmp_path / "c.yaml",
            text.replace("[0, 1]", "[0, 1, {min_speedup: 1.01}]")
            + "methods: [gate-norm, {name: harp-free, seed: 3}]\n",
        )
    )[0]
    again = batch.plan_batch(changed, "c", cache=cache)
    assert calls == ["gate-norm", "harp-free"]
    assert len(again.budgets["t / gate-norm"]) == 3  # the target budget was resolved
    from gatenorm.recipes.sources import resolve_source

    used = batch.plans_key(resolve_source(changed.models[0]), changed.methods[0], changed)
    (cache / f"{used}.json").write_text("{not json")  # a damaged entry is made again, not trusted
    calls.clear()
    assert batch.plan_batch(changed, "c", cache=cache) == again and len(calls) == 1


def test_card_title_and_plan_text():
    """Cards are titled by the source's file name (no quant suffix), and describe every plan action."""
    from gatenorm.recipes.card import model_title
    from gatenorm.validate.result import Average

    assert model_title(Path("/m/SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct"
    assert model_title(Path("/m/Llama-3.2-1B.Q4_K_M.gguf")) == "Llama-3.2-1B"
    assert model_title(Path("/m/Llama-3.2-1B")) == "Llama-3.2-1B"  # an HF folder: its name
    assert model_title(Path("/m/model.v2.gguf")) == "model.v2"  # not a quant suffix
    assert (
        Average(reference=0.5, reference_err=0.025, candidate=0.5, drop_points=0).percent("reference")
        == "50.0 ± 2.5"
    )
    assert (
        Average(reference=0.5, candidate=0.5, drop_points=0).percent("reference") == "50.0"
    )  # reports written before it
