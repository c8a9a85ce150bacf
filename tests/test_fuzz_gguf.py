"""Seeded, bounded GGUF fuzzing through the CLI's commands: every case loads or raises GatenormError, quickly.

The cases mutate the shipped tiny GGUF, a gatenorm export of it (it carries a plan, for ``inspect``) and
SmolLM2 (see tests/gguf_fuzz.py); ``scripts/fuzz_gguf.py`` runs the same cases by the ten thousand.
"""

from __future__ import annotations

import pytest
from gguf_fuzz import COMMANDS, REGRESSIONS, Layout, mutate, regression_case, run_command

#: CPU seconds one command may take on one case (the slowest, a SmolLM2 score or export, takes 1-2 s).
LIMIT = 10.0
CI_CASES = 150
#: Regression cases whose header is sound and whose tensors disagree with it: ``inspect`` reads no tensors.
TENSOR_ONLY = {"block-count-huge", "head-count-vs-shapes", "kv-head-count-vs-shapes", "width-vs-shapes"}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, tiny_gguf, smollm2_gguf):
    from exporters.export import export, open_model
    from gatenorm.methods import make_method_plan

    ckpt = open_model(tiny_gguf)
    exported = export(
        ckpt, make_method_plan(ckpt, "gate-norm", 1), tmp_path_factory.mktemp("base") / "e.gguf"
    )
    return {
        "tiny": Layout.of(tiny_gguf),
        "tiny-export": Layout.of(exported),
        "smollm2": Layout.of(smollm2_gguf),
    }


def _run_all(path, out_dir) -> list[str]:
    problems = []
    for command in COMMANDS:
        outcome, seconds = run_command(command, path, out_dir, LIMIT)
        if outcome not in ("ok", "GatenormError") or seconds > LIMIT:
            problems.append(f"{command}: {outcome} ({seconds:.1f} s)")
    return problems


def test_unmutated_files_load(layouts, tmp_path):
    """The harness itself: unmutated bases score and export (the tiny export is a deci file: inspect only)."""
    out = tmp_path / "out"
    out.mkdir()
    for name, lay in layouts.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(lay.encode())
        outcomes = {c: run_command(c, path, out, LIMIT)[0] for c in COMMANDS}
        if name == "tiny-export":
            assert outcomes["inspect"] == "ok", outcomes
        else:
            assert outcomes["score"] == outcomes["export"] == "ok", (name, outcomes)


def test_fuzz_cases_load_or_raise_gatenorm_error(layouts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    case = tmp_path / "case.gguf"
    failures = []
    for seed in range(CI_CASES):
        name = "smollm2" if seed % 25 == 0 else "tiny-export" if seed % 3 == 0 else "tiny"
        data, what = mutate(layouts[name], seed)
        case.write_bytes(data)
        problems = _run_all(case, out)
        failures += [f"{name} seed {seed} [{what}] {p}" for p in problems]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_regression_cases_raise_gatenorm_error(name, layouts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    case = tmp_path / "case.gguf"
    case.write_bytes(regression_case(layouts["tiny"], name))
    for command in ("score", "export"):
        outcome, _ = run_command(command, case, out, LIMIT)
        assert outcome == "GatenormError", (command, outcome)
    case.write_bytes(regression_case(layouts["tiny-export"], name))
    outcome, _ = run_command("inspect", case, out, LIMIT)
    assert outcome == ("ok" if name in TENSOR_ONLY else "GatenormError"), ("inspect", outcome)
