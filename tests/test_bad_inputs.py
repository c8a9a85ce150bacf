"""Hostile and corrupt inputs through the CLI (issue 14): one line on stderr, exit 2, nothing written.

Each case runs ``gatenorm.cli.main`` in-process (the console script's entry point) with its arguments; two
GGUF cases also run as a real subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf_fuzz import Layout, regression_case
from safetensors.torch import load_file, save_file

from gatenorm.cli import main


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``gatenorm ARGS`` run in this process."""
    monkeypatch.setattr(sys, "argv", ["gatenorm", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out, out.err


def assert_one_line_exit_2(code: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gatenorm: error: "), (code, err)
    for word in words:
        assert word in lines[0], (word, lines[0])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- GGUF -----------------------------------------------------------------------------------------------

GGUF_CASES = {  # regression case -> words of the message
    "alignment-zero": ["general.alignment", "power of two"],
    "alignment-wrong-type": ["general.alignment", "UINT32"],
    "name-not-utf8": ["general.name", "UTF-8"],
    "architecture-not-utf8": ["general.architecture", "UTF-8"],
    "huge-array-count": ["tokenizer.ggml.tokens", "bytes"],
    "nested-arrays": ["nested arrays"],
    "duplicate-head-count-zero": ["duplicate key", "llama.attention.head_count"],
    "head-count-nan": ["llama.attention.head_count", "integer"],
    "head-count-vs-shapes": ["n_head 2 is not a multiple of n_head_kv 4"],
    "kv-head-count-vs-shapes": ["blk.0.attn_k.weight", "2 KV heads"],
    "width-vs-shapes": ["blk.0.attn_q.weight", "width 32"],
    "tensor-type-vs-bytes": ["blk.0.attn_k.weight", "offset"],
    "tensor-dims-overflow": ["blk.0.attn_q.weight"],
    "duplicate-tensor-name": ["duplicate name"],
    "tensor-offset-outside": ["output.weight"],
}


@pytest.fixture(scope="module")
def tiny_layout(tiny_gguf) -> Layout:
    return Layout.of(tiny_gguf)


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
@pytest.mark.parametrize("command", ["score", "export"])
def test_corrupt_gguf_one_line(case, command, tiny_layout, tmp_path, monkeypatch, capsys):
    path = tmp_path / "bad.gguf"
    path.write_bytes(regression_case(tiny_layout, case))
    args = [command, path] + (["--drop", "1", "-o", tmp_path / "out.gguf"] if command == "export" else [])
    code, _, err = cli(monkeypatch, capsys, *args)
    assert_one_line_exit_2(code, err, str(path), *GGUF_CASES[case])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


@pytest.mark.parametrize("case", ["alignment-zero", "nested-arrays"])
def test_corrupt_gguf_subprocess(case, tiny_layout, tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(regression_case(tiny_layout, case))
    out = subprocess.run(
        [sys.executable, "-m", "gatenorm.cli", "score", str(path)], capture_output=True, text=True
    )
    assert_one_line_exit_2(out.returncode, out.stderr, str(path), *GGUF_CASES[case])


# --- HF safetensors folders -----------------------------------------------------------------------------

WEIGHTS = "model.safetensors"
Q1 = "model.layers.1.self_attn.q_proj.weight"


def _config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def _tensors(folder: Path, **changes) -> None:
    tensors = load_file(folder / WEIGHTS)
    for name, value in changes.items():
        tensors[name.replace("__", ".")] = value
    save_file(tensors, folder / WEIGHTS)


def _index(folder: Path, doc) -> None:
    path = folder / "model.safetensors.index.json"
    path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())


def _names(folder: Path) -> list[str]:
    return sorted(load_file(folder / WEIGHTS))


HF_CASES = {
    "config-list": (lambda f: (f / "config.json").write_text("[1, 2]"), ["config.json", "JSON object"]),
    "config-null": (lambda f: (f / "config.json").write_text("null"), ["config.json", "JSON object"]),
    "config-missing": (lambda f: (f / "config.json").unlink(), ["no config.json"]),
    "config-not-json": (lambda f: (f / "config.json").write_text("{"), ["config.json"]),
    "config-not-utf8": (lambda f: (f / "config.json").write_bytes(b"\xff\xfe{}"), ["not UTF-8"]),
    "model-type-list": (lambda f: _config(f, model_type=["llama"]), ["model_type must be a string"]),
    "model-type-unsupported": (lambda f: _config(f, model_type="gpt9", architectures=...), ["unsupported"]),
    "layers-string": (lambda f: _config(f, num_hidden_layers="4"), ["num_hidden_layers", "integer"]),
    "heads-zero": (lambda f: _config(f, num_attention_heads=0), ["num_attention_heads", "out of range"]),
    "hidden-size-vs-tensors": (lambda f: _config(f, hidden_size=128), ["q_proj", "width 128"]),
    "q-proj-shape": (lambda f: _tensors(f, **{Q1: torch.zeros(32, 64)}), [Q1, "shape (32, 64)"]),
    "q-proj-int8": (lambda f: _tensors(f, **{Q1: torch.zeros(64, 64, dtype=torch.int8)}), [Q1, "I8"]),
    "q-proj-int32": (lambda f: _tensors(f, **{Q1: torch.zeros(64, 64, dtype=torch.int32)}), [Q1, "I32"]),
    "index-not-utf8": (lambda f: _index(f, b"\xff\xfe"), ["not UTF-8"]),
    "index-wrong-shape": (lambda f: _index(f, {"weight_map": [1, 2]}), ["weight_map"]),
    "index-missing-file": (
        lambda f: _index(f, {"weight_map": dict.fromkeys(_names(f), "gone.safetensors")}),
        ["gone.safetensors", "does not exist"],
    ),
    "index-outside-folder": (
        lambda f: _index(f, {"weight_map": dict.fromkeys(_names(f), "../x.safetensors")}),
        ["outside"],
    ),
    "index-extra-tensor": (
        lambda f: _index(f, {"weight_map": dict.fromkeys([*_names(f), "extra.weight"], WEIGHTS)}),
        ["extra.weight"],
    ),
    "index-missing-tensor": (
        lambda f: _index(f, {"weight_map": dict.fromkeys(_names(f)[1:], WEIGHTS)}),
        ["leaves out"],
    ),
    "safetensors-truncated": (
        lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:-100]),
        [WEIGHTS, "incomplete"],
    ),
    "safetensors-header-too-long": (
        lambda f: (f / WEIGHTS).write_bytes(struct.pack("<Q", 2**40) + (f / WEIGHTS).read_bytes()[8:]),
        [WEIGHTS, "header"],
    ),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_bad_hf_folder_one_line(case, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    mutate, words = HF_CASES[case]
    mutate(folder)
    code, _, err = cli(monkeypatch, capsys, "score", folder)
    assert_one_line_exit_2(code, err, *words)


# --- plans ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_plan(tiny_gguf, tmp_path_factory) -> dict:
    from gatenorm.methods import make_method_plan
    from gatenorm.readers import open_checkpoint

    return json.loads(make_method_plan(open_checkpoint(tiny_gguf), "gate-norm", 1).to_json())


def _plan_with(doc: dict, **source) -> dict:
    return {**doc, "source": {**doc["source"], **source}}


def _all_blocks(doc: dict) -> dict:
    layers = [{**lp, "action": "drop-block"} for lp in doc["layers"]]
    return {**doc, "layers": layers, "budget": len(layers)}


PLAN_CASES = {
    "n-layers-huge": (lambda d: json.dumps(_plan_with(d, n_layers=10**12)), ["n_layers"]),
    "every-layer-drop-block": (lambda d: json.dumps(_all_blocks(d)), ["at least one block"]),
    "binary": (lambda d: b"\x00\xff\xfe\x81" * 64, ["not UTF-8"]),
    "utf16": (lambda d: json.dumps(d).encode("utf-16"), ["not UTF-8"]),
    "nan-score": (lambda d: json.dumps(d).replace('"score": ', '"score": NaN, "x": ', 1), ["invalid plan"]),
    "nan-score-only": (
        lambda d: json.dumps({**d, "layers": [{**d["layers"][0], "score": float("nan")}, *d["layers"][1:]]}),
        ["score must be finite"],
    ),
    "layer-out-of-range": (
        lambda d: json.dumps({**d, "layers": [d["layers"][0], {**d["layers"][1], "layer": 7}]}),
        ["layers must list 0..1"],
    ),
    "schema-version": (lambda d: json.dumps({**d, "schema_version": 9}), ["schema_version"]),
    "other-checkpoint": (lambda d: json.dumps(_plan_with(d, sha256="0" * 64)), ["made for"]),
    "other-layer-count": (lambda d: json.dumps(_plan_with(d, n_layers=3)), ["layers must list"]),
    "other-architecture": (lambda d: json.dumps(_plan_with(d, architecture="qwen2")), ["qwen2"]),
}


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_bad_plan_one_line(case, tiny_plan, tiny_gguf, tmp_path, monkeypatch, capsys):
    make, words = PLAN_CASES[case]
    plan = tmp_path / "plan.json"
    text = make(tiny_plan)
    plan.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, _, err = cli(monkeypatch, capsys, "export", tiny_gguf, "--plan", plan, "-o", tmp_path / "out.gguf")
    assert_one_line_exit_2(code, err, *words)
    assert not (tmp_path / "out.gguf").exists()


# --- recipes --------------------------------------------------------------------------------------------

RECIPE_CASES = {
    "nested-5000": ("models: " + "[" * 5000 + "]" * 5000 + "\n", ["nested deeper than 64"]),
    "duplicate-key": (
        "models: [smollm2]\nmethods: [gate-norm]\nmodels: [tiny]\n",
        ["3:", "duplicate key 'models'"],
    ),
}


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_bad_recipe_one_line(case, tmp_path, monkeypatch, capsys):
    text, words = RECIPE_CASES[case]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    code, _, err = cli(monkeypatch, capsys, "run", recipe, "--dry-run")
    assert_one_line_exit_2(code, err, str(recipe), *words)


# --- outputs --------------------------------------------------------------------------------------------


@pytest.fixture
def model_copy(tiny_gguf, tmp_path) -> Path:
    path = tmp_path / "m.gguf"
    shutil.copy(tiny_gguf, path)
    return path


def test_output_equal_to_an_input_refused_before_writing(
    model_copy, tiny_plan, tmp_path, monkeypatch, capsys
):
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps(tiny_plan))
    before = snapshot(tmp_path)
    for args, label in [
        (["export", model_copy, "--drop", "1", "-o", model_copy], "the model"),
        (["export", model_copy, "--drop", "1", "-o", tmp_path / "." / "m.gguf"], "the model"),
        (["export", model_copy, "--plan", plan, "-o", plan], "the plan"),
        (["plan", model_copy, "--drop", "1", "-o", model_copy], "the model"),
        (["score", model_copy, "--json", model_copy], "the model"),
    ]:
        code, _, err = cli(monkeypatch, capsys, *args)
        assert_one_line_exit_2(code, err, "would overwrite", label)
    os.link(model_copy, tmp_path / "hard.gguf")  # another name of the same file
    code, _, err = cli(monkeypatch, capsys, "export", model_copy, "--drop", "1", "-o", tmp_path / "hard.gguf")
    assert_one_line_exit_2(code, err, "would overwrite")
    (tmp_path / "hard.gguf").unlink()
    assert snapshot(tmp_path) == before


def test_export_across_file_systems_falls_back_to_a_plain_copy(model_copy, tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "export", model_copy, "--drop", "1", "-o", tmp_path / "a.gguf")
    assert code == 0, err
    calls = []

    def cross_device(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cross_device)
    code, _, err = cli(monkeypatch, capsys, "export", model_copy, "--drop", "1", "-o", tmp_path / "b.gguf")
    assert code == 0, err
    assert calls and (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_read_only_destination_names_the_target(model_copy, tmp_path, monkeypatch, capsys):
    import tempfile

    def read_only(*args, prefix="", dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", os.path.join(dir, prefix + "abc.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    out = tmp_path / "ro" / "out.gguf"
    code, _, err = cli(monkeypatch, capsys, "export", model_copy, "--drop", "1", "-o", out)
    assert_one_line_exit_2(code, err, f"cannot write {out}: Read-only file system")
    assert ".tmp" not in err and list((tmp_path / "ro").iterdir()) == []


def test_leftovers_of_killed_runs_are_removed_and_outputs_fsynced(model_copy, tmp_path, monkeypatch, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "out.gguf"
    stale_file = tmp_path / f".out.gguf.gatenorm-{dead.pid}.abc.tmp"
    stale_scratch = tmp_path / f".out.gguf.gatenorm-{dead.pid}.pruned.xyz.tmp"
    stale_dir = tmp_path / f".out.gguf.gatenorm-{dead.pid}.def.tmp"
    live = tmp_path / f".out.gguf.gatenorm-{os.getppid()}.ghi.tmp"  # a live process's: kept
    for p in (stale_file, stale_scratch, live):
        p.write_bytes(b"x" * 1000)
    stale_dir.mkdir()
    (stale_dir / "model.onnx").write_bytes(b"x")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd)
    )
    code, _, err = cli(monkeypatch, capsys, "export", model_copy, "--drop", "1", "-o", out)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.gguf", "out.gguf", live.name])
    assert any(".out.gguf.gatenorm-" in s for s in synced)  # the file, before its rename


def test_onnx_head_size_refused_before_any_conversion(tiny_gguf, tmp_path, monkeypatch, capsys):
    import exporters.onnx.export as onnx_export

    def never(*args, **kwargs):
        raise AssertionError("converted before the head-size check")

    monkeypatch.setattr(onnx_export, "SequentialModel", never)
    monkeypatch.setattr(onnx_export, "load_tokenizer", never)
    code, _, err = cli(
        monkeypatch, capsys, "export", tiny_gguf, "--to", "onnx", "--drop", "1", "-o", tmp_path / "o"
    )
    assert_one_line_exit_2(code, err, "head size 4 is not a multiple of 8")
    assert list(tmp_path.iterdir()) == []


def test_export_overwrite_flag(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "onnx"
    out.mkdir()
    code, _, err = cli(
        monkeypatch, capsys, "export", tiny_llama_dir, "--to", "onnx", "--drop", "1", "-o", out
    )
    assert_one_line_exit_2(code, err, "already exists (pass --overwrite")
    import exporters.onnx as onnx_package

    seen = {}

    def fake_export(model_path, plan, out_dir, precision, overwrite=False, **kwargs):
        seen["overwrite"] = overwrite
        return Path(out_dir)

    monkeypatch.setattr(onnx_package, "export_onnx", fake_export)
    args = ("export", tiny_llama_dir, "--to", "onnx", "--drop", "1", "-o", out, "--overwrite")
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 0 and seen == {"overwrite": True}, err


USAGE_CASES = {  # arguments -> words of the message (Typer's own parsing: flags, choices, types)
    "unknown method": (["plan", "tiny", "--method", "bogus", "-o", "{d}/p.json"], ["--method", "'bogus'"]),
    "unknown target": (["export", "tiny", "--to", "bogus", "-o", "{d}/x.gguf"], ["--to", "'bogus'"]),
    "not an integer": (["plan", "tiny", "--drop", "abc", "-o", "{d}/p.json"], ["--drop", "integer"]),
    "unknown command": (["bogus"], ["No such command 'bogus'"]),
    "missing argument": (["plan"], ["Missing argument", "gatenorm plan --help"]),
    "unknown option": (["plan", "tiny", "--nope"], ["No such option: --nope"]),
}


@pytest.mark.parametrize("case", sorted(USAGE_CASES))
def test_usage_errors_are_one_line_exit_2(case, tmp_path, monkeypatch, capsys):
    args, words = USAGE_CASES[case]
    code, out, err = cli(monkeypatch, capsys, *(a.format(d=tmp_path) for a in args))
    assert_one_line_exit_2(code, err, *words)
    assert not out and not list(tmp_path.iterdir())


def test_exit_codes_pass_through(tmp_path, monkeypatch, capsys):
    """Help and success exit 0 (a bare `gatenorm` shows the help, exit 2); a command's own exit code (a
    failed validation gate: 1) is kept."""
    import typer

    from gatenorm.cli import app

    assert cli(monkeypatch, capsys, "--help")[0] == 0
    code, out, err = cli(monkeypatch, capsys)  # bare: the help, as click exits for it
    assert code == 2 and "Usage" in out and "plan" in out and not err
    assert cli(monkeypatch, capsys, "plan", "tiny", "--drop", "1", "-o", tmp_path / "p.json")[0] == 0
    assert (tmp_path / "p.json").is_file()

    def gate_fails() -> None:
        raise typer.Exit(1)

    app.command("gate-fails")(gate_fails)
    try:
        assert cli(monkeypatch, capsys, "gate-fails")[0] == 1
    finally:
        app.registered_commands.pop()


# --- out of memory ----------------------------------------------------------------------------------------


def test_out_of_memory_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """An allocation that fails anywhere in a command (numpy's MemoryError, torch's RuntimeError) is one line
    naming the command, its model and the memory asked for, exit 2, and no plan is written."""
    import numpy as np

    import gatenorm.cli

    out = tmp_path / "p.json"
    failures = {  # a real failed allocation of each library -> the size the line names
        "1.00 EiB": lambda: np.empty(1 << 60, np.uint8),
        "1024.00 GiB": lambda: torch.empty(1 << 40, dtype=torch.uint8),
    }
    for asked, allocate in failures.items():
        monkeypatch.setattr(gatenorm.cli, "rank_layers", lambda *_, allocate=allocate, **__: allocate())
        code, _, err = cli(monkeypatch, capsys, "plan", "tiny", "--drop", "1", "-o", out)
        assert_one_line_exit_2(
            code, err, "out of memory: gatenorm plan on tiny", f"an allocation of {asked} failed", "available"
        )
        assert not list(tmp_path.iterdir())


def test_out_of_memory_while_writing_leaves_no_output(model_copy, tmp_path, monkeypatch, capsys):
    """A MemoryError after the export has written its temporary file: one line, and neither the output nor
    the temporary file is left."""
    import exporters.gguf

    write = exporters.gguf.prune_gguf

    def write_then_run_out(*args, **kwargs):
        write(*args, **kwargs)
        raise MemoryError

    monkeypatch.setattr(exporters.gguf, "prune_gguf", write_then_run_out)
    out = tmp_path / "out" / "pruned.gguf"
    code, _, err = cli(monkeypatch, capsys, "export", model_copy, "--drop", "1", "-o", out)
    assert_one_line_exit_2(code, err, f"out of memory: gatenorm export on {model_copy}")
    assert not list(out.parent.iterdir())


def test_other_runtime_errors_are_not_taken_for_memory(tmp_path, monkeypatch):
    """Only allocation failures become the out-of-memory line; any other error keeps its traceback."""
    import gatenorm.cli

    def fail(*_, **__):
        raise RuntimeError("a bug")

    monkeypatch.setattr(gatenorm.cli, "rank_layers", fail)
    monkeypatch.setattr(
        sys, "argv", ["gatenorm", "plan", "tiny", "--drop", "1", "-o", str(tmp_path / "p.json")]
    )
    with pytest.raises(RuntimeError, match="a bug"):
        main()
