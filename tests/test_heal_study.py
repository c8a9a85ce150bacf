"""The methods study's heal stage (`gatenorm.study.run`, docs/study.md's Healing section) on the shipped
tiny model with minimal settings: healed rows in the results and the table, the repair's cost counted in
the estimated speedup, bad settings refused."""

from __future__ import annotations

import json
import shutil

import pytest

from gatenorm.errors import GatenormError
from gatenorm.study.prose import BEGIN, END
from gatenorm.study.run import main

SMALL = [
    "--model", "tiny", "--budgets", "1", "--heal-budgets", "1", "--eval-windows", "2", "--eval-len", "32",
    "--calib-samples", "2", "--calib-len", "32", "--harp-samples", "1", "--ctx", "32", "--threads", "1",
    "--zeroshot-budgets", "", "--heal-settings", '{"samples": 2, "length": 32}',
]  # fmt: skip
METHODS = "gate-norm,mixed-synthetic"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("heal-study")
    domain = out / "domain.txt"
    domain.write_text(" ".join(["The river flows past the old mill into the valley."] * 200))
    args = [*SMALL, "--methods", METHODS, "--heal-methods", METHODS, "--cache", str(out / "r.json"),
            "--heal-compare", f"wiki-heldout,{domain}", "--heal-dir", str(out / "healed")]  # fmt: skip
    main([*args, "--docs", str(out), "--stages", "rank,quality,report", "--heal"])
    return out, json.loads((out / "r.json").read_text())


def test_heal_stage_records_healed_beside_unhealed(study):
    _, data = study
    for method in METHODS.split(","):
        entry = data["heal"][f"{method}/1"]
        unhealed = data["quality"][f"{method}/1"]
        # the one changed layer of the 2-layer model, folded into layer 0's down projection
        assert entry["repaired"] == [] and entry["refitted"] == [0]
        assert entry["quality"]["tokens"] == unhealed["tokens"] == 2 * 31  # the same evaluation windows
        assert entry["quality"]["kld"] != pytest.approx(unhealed["kld"], rel=1e-6)  # the repair acts
        assert entry["est"] == entry["est_unhealed"]  # a fold costs nothing
        assert entry["fit_seconds"] > 0 and entry["settings"]["samples"] == 2
    assert data["heal"]["calibration"]["windows"] == [2, 32]
    assert data["settings"]["text_split"]["heal_articles"] == "synthetic"


def test_report_has_the_healing_table_and_figure(study):
    out, data = study
    text = (out / "study.md").read_text()
    section = text[text.index("## Healing") :]
    main_table = section[: section.index("### The same plans healed on other calibration text")]
    rows = [line for line in main_table.splitlines() if line.startswith("| ") and "| 1 |" in line]
    assert len(rows) == 2, rows
    for method, row in zip(("Gate-Norm", "mixed, self-generated"), rows, strict=True):
        assert row.startswith(f"| {method}")
        cells = [c.strip() for c in row.strip("|").split("|")]
        key = "gate-norm/1" if method == "Gate-Norm" else "mixed-synthetic/1"
        assert cells[4].startswith(f"{data['heal'][key]['quality']['kld']:.4f}")  # KLD healed
        assert cells[3].startswith(f"{data['quality'][key]['kld']:.4f}")  # KLD unhealed
    assert "healed KLD <= 0.6x unhealed" in section and "in form `fold`" in section
    fits = [data["heal"][k]["fit_seconds"] for k in ("gate-norm/1", "mixed-synthetic/1")]
    generation = data["heal"]["calibration"]["seconds"]
    assert f"the longest plan's fit {max(fits):.1f} s" in section
    assert f"calibration text, {generation:.0f} s here: {generation + max(fits):.0f} s" in section
    assert (out / "study_heal.png").stat().st_size > 1000


def test_a_compared_calibration_heals_the_same_plans_on_its_text(study):
    """``--heal-compare wiki-heldout,FILE``: the same plans, the same settings, fitted on held-out leads
    disjoint from the evaluation's and on a text file; columns of the report and target lines of their own,
    the plans in ``--heal-dir`` side by side."""
    out, data = study
    domain = out / "domain.txt"
    assert data["settings"]["text_split"][f"heal:{domain}_articles"].startswith("file:")
    assert data[f"heal:{domain}"]["gate-norm/1"]["settings"]["calib"] == str(domain)
    names = {p.name for p in (out / "healed").glob("*.json")}
    assert {"gate-norm-1.json", "heal-wiki-heldout-gate-norm-1.json"} <= names, names
    assert any(n.startswith("heal-") and n.endswith("-domain-txt-gate-norm-1.json") for n in names), names
    split = data["settings"]["text_split"]
    first, last = split["heal:wiki-heldout_articles"]
    assert last < split["eval_articles"][0] or first > split["eval_articles"][1]
    compared = data["heal:wiki-heldout"]
    assert compared["calibration"]["settings"] == {
        **data["heal"]["calibration"]["settings"],
        "calib": "wiki-heldout",
    }
    for method in METHODS.split(","):
        key = f"{method}/1"
        assert compared[key]["refitted"] == data["heal"][key]["refitted"] == [0]
        assert compared[key]["quality"]["kld"] != pytest.approx(data["heal"][key]["quality"]["kld"], rel=1e-6)
        assert "zeroshot" not in compared[key]
    text = (out / "study.md").read_text()
    table = text[
        text.index("### The same plans healed on other calibration text") : text.index("### Targets")
    ]
    header = next(line for line in table.splitlines() if line.startswith("| method |"))
    row = next(line for line in table.splitlines() if line.startswith("| Gate-Norm | 1 |"))
    cells = dict(
        zip(*([c.strip() for c in line.strip("|").split("|")] for line in (header, row)), strict=False)
    )
    assert cells["KLD healed, `synthetic`"] == f"{data['heal']['gate-norm/1']['quality']['kld']:.4f}"
    assert cells["KLD healed, `wiki-heldout`"] == f"{compared['gate-norm/1']['quality']['kld']:.4f}"
    assert (
        cells[f"KLD healed, `{domain}`"] == f"{data[f'heal:{domain}']['gate-norm/1']['quality']['kld']:.4f}"
    )
    assert "Gate-Norm, healed on `wiki-heldout` text" in text
    assert "Gate-Norm, healed on `synthetic` text (generated by the model: no data)" in text
    # the report follows the flags: without --heal-compare, no comparison (its results stay cached)
    shutil.copy(out / "r.json", out / "again.json")
    args = [*SMALL, "--methods", METHODS, "--heal-methods", METHODS, "--cache", str(out / "again.json")]
    main([*args, "--docs", str(out / "again"), "--stages", "report"])
    again = (out / "again" / "study.md").read_text()
    assert "## Healing" in again and "other calibration text" not in again
    assert "`wiki-heldout` text" not in again
    assert "heal:wiki-heldout" in json.loads((out / "again.json").read_text())


def test_heal_settings_are_checked(tmp_path):
    with pytest.raises(GatenormError, match=r"--heal-settings.*ridge"):
        main(
            [*SMALL, "--heal-settings", '{"ridge": -1}', "--cache", str(tmp_path / "r.json"), "--stages", ""]
        )
    with pytest.raises(GatenormError, match="--heal-compare wiki: --calib wiki is the evaluation text"):
        main([*SMALL, "--heal-compare", "wiki", "--cache", str(tmp_path / "r.json"), "--stages", ""])
    assert not (tmp_path / "r.json").exists()


def test_heal_needs_the_methods_rankings(tmp_path):
    with pytest.raises(GatenormError, match="no ranking of it"):
        main([*SMALL, "--heal-methods", "attention-cosine", "--cache", str(tmp_path / "r.json"), "--heal",
              "--stages", ""])  # fmt: skip


def test_the_report_keeps_its_hand_written_regions(study):
    """The findings live in docs/study.md between markers: rewriting the report from the results JSON keeps
    them as they are, and refuses (writing nothing) to drop a region it has no place for."""
    out, _ = study
    docs = out / "prose"
    docs.mkdir()
    text = (out / "study.md").read_text()
    begin = BEGIN.format(name="reading")
    assert text.count(begin) == 1
    finding = "- On this model, a finding written by hand (1.23x: KLD 0.73)."
    (docs / "study.md").write_text(text.replace(f"{begin}\n", f"{begin}\n## Reading\n\n{finding}\n"))
    args = [*SMALL, "--methods", METHODS, "--heal-methods", METHODS, "--cache", str(out / "r.json")]
    main([*args, "--docs", str(docs), "--stages", "report"])
    again = (docs / "study.md").read_text()
    assert f"{begin}\n## Reading\n\n{finding}\n{END}\n" in again
    assert again.count("<!-- hand-written: ") == text.count("<!-- hand-written: ")
    unplaced = again + f"\n{BEGIN.format(name='renamed')}\nold text\n{END}\n"
    (docs / "study.md").write_text(unplaced)
    with pytest.raises(GatenormError, match=r"no place for hand-written region.*renamed"):
        main([*args, "--docs", str(docs), "--stages", "report"])
    assert (docs / "study.md").read_text() == unplaced
    (docs / "study.md").write_text(f"{begin}\nnever closed\n")
    with pytest.raises(GatenormError, match="'reading' is not closed"):
        main([*args, "--docs", str(docs), "--stages", "report"])


def test_study_quality_on_the_engine_equals_the_whole_model(smollm2_gguf, smollm2_model):
    """The study's quality stages run on the layer-sequential engine (reference and plans in one pass): the
    same PPL, KLD and top-1 as the whole float32 model with the plan applied."""
    import copy

    import numpy as np

    from gatenorm.apply import apply_plan
    from gatenorm.readers import open_checkpoint
    from gatenorm.sequential import SequentialModel
    from gatenorm.study.run import engine_qualities, logits_of, quality_of
    from tests.conftest import mixed_plan

    ckpt = open_checkpoint(smollm2_gguf)
    plans = [
        mixed_plan(ckpt, {20: "drop-attention", 25: "linearize"}, {25: 0.4}),
        mixed_plan(ckpt, {9: "drop-block", 28: "drop-attention"}, {}),
    ]
    windows = np.random.default_rng(0).integers(1, 40000, size=(2, 48)).astype(np.int64)
    ref, got = engine_qualities(SequentialModel(ckpt), windows, plans)
    whole_ref = logits_of(smollm2_model, windows)
    assert max(float(np.abs(a - b).max()) for a, b in zip(ref, whole_ref, strict=True)) < 1e-3
    for plan, q in zip(plans, got, strict=True):
        expected = quality_of(apply_plan(copy.deepcopy(smollm2_model), plan), windows, whole_ref)
        assert q.keys() == expected.keys() and q["tokens"] == expected["tokens"] == 2 * 47
        for name in ("ppl", "kld", "top1", "ppl_ref"):
            assert q[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name


def test_measures_on_other_evaluation_windows_are_redone(study, tmp_path):
    """The results JSON records the evaluation windows' sha256: KLD / PPL measured on other windows (a
    tokenizer that now adds no BOS, other text) are measured again, healed ones refitted; the same windows
    resume."""
    _, data = study
    args = [*SMALL, "--methods", METHODS, "--heal-methods", METHODS, "--cache", str(tmp_path / "r.json"),
            "--stages", "quality", "--heal"]  # fmt: skip
    for recorded, redone in ((data["eval_windows_sha256"], False), ("0" * 64, True)):
        stale = json.loads(json.dumps(data))
        stale["eval_windows_sha256"] = recorded
        stale["quality"]["gate-norm/1"]["kld"] = stale["heal"]["gate-norm/1"]["quality"]["kld"] = 123.0
        (tmp_path / "r.json").write_text(json.dumps(stale))
        main(args)
        again = json.loads((tmp_path / "r.json").read_text())
        assert again["eval_windows_sha256"] == data["eval_windows_sha256"]
        for kld in (again["quality"]["gate-norm/1"]["kld"], again["heal"]["gate-norm/1"]["quality"]["kld"]):
            assert (kld != 123.0) is redone


def test_evaluation_and_calibration_windows_agree_on_bos(smollm2_gguf, tiny_gguf):
    """The study's evaluation windows start with BOS exactly where its calibration windows (and `validate`)
    do: where the tokenizer adds one (SmolLM2's GGUF says it adds none; transformers 4 added <|im_start|>)."""
    import argparse

    from gatenorm.apply import load_tokenizer
    from gatenorm.methods.calibration import Calibration
    from gatenorm.study.run import eval_windows
    from gatenorm.validate.text import WIKI_HELDOUT, hf_bos_id

    for path in (smollm2_gguf, tiny_gguf):
        tokenizer = load_tokenizer(path)
        bos = hf_bos_id(tokenizer)
        evaluated = eval_windows(argparse.Namespace(eval_windows=4, eval_len=32), tokenizer)
        calibrated = Calibration(WIKI_HELDOUT, 4, 32).windows(tokenizer)
        for windows in (evaluated, calibrated):
            if bos is None:  # a window starts mid-text, never with the BOS token throughout
                assert not (windows[:, 0] == tokenizer.bos_token_id).all()
            else:
                assert (windows[:, 0] == bos).all()
