"""The methods study's heal stage (`gatenorm.study.run`, docs/study.md's Healing section) on the shipped
tiny model with minimal settings: healed rows in the results and the table, the repair's cost counted in
the estimated speedup, bad settings refused."""

from __future__ import annotations

import json

import pytest

from gatenorm.errors import GatenormError
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
    args = [*SMALL, "--methods", METHODS, "--heal-methods", METHODS, "--cache", str(out / "r.json")]
    main([*args, "--docs", str(out), "--stages", "rank,quality,report", "--heal"])
    return out, json.loads((out / "r.json").read_text())


@pytest.mark.slow  # the study fixture: about 3 minutes
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


@pytest.mark.slow
def test_report_has_the_healing_table_and_figure(study):
    out, data = study
    text = (out / "study.md").read_text()
    section = text[text.index("## Healing") :]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "| 1 |" in line]
    assert len(rows) == 2, rows
    for method, row in zip(("Gate-Norm", "mixed, self-generated"), rows, strict=True):
        assert row.startswith(f"| {method}")
        cells = [c.strip() for c in row.strip("|").split("|")]
        key = "gate-norm/1" if method == "Gate-Norm" else "mixed-synthetic/1"
        assert cells[4].startswith(f"{data['heal'][key]['quality']['kld']:.4f}")  # KLD healed
        assert cells[3].startswith(f"{data['quality'][key]['kld']:.4f}")  # KLD unhealed
    assert "healed KLD <= 0.6x unhealed" in section and "in form `fold`" in section
    assert (out / "study_heal.png").stat().st_size > 1000


def test_heal_settings_are_checked(tmp_path):
    with pytest.raises(GatenormError, match=r"--heal-settings.*ridge"):
        main(
            [*SMALL, "--heal-settings", '{"ridge": -1}', "--cache", str(tmp_path / "r.json"), "--stages", ""]
        )


def test_heal_needs_the_methods_rankings(tmp_path):
    with pytest.raises(GatenormError, match="no ranking of it"):
        main([*SMALL, "--heal-methods", "attention-cosine", "--cache", str(tmp_path / "r.json"), "--heal",
              "--stages", ""])  # fmt: skip
