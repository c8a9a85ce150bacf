"""scripts/bench_gguf.py's ideal speedups come from the one cost model (`gatenorm.methods.cost`): on pruned
SmolLM2 GGUFs written by ``gatenorm export`` they agree with `CostModel` on the source and its plan, and
with FLOPs and bytes counted from the written file's own tensors."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from exporters.export import export_gguf
from gatenorm.methods.cost import cost_model
from gatenorm.plan import LayerAction, Plan, make_plan
from gatenorm.readers import open_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gguf.py"
PP, TG = 512, 128


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gguf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gguf"] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_gguf", None)


def counted(path: Path, pp: int, tg: int) -> tuple[float, float, float]:
    """(prefill FLOPs, decode FLOPs, decode bytes) per token counted from the file's tensors: 2 FLOPs per
    weight of every layer matrix, q.k and p.v over the keys of the layers that keep a KV cache, the LM head
    in decode; bytes as stored, the K and V cache in f16 (norms: a few KiB, not in the cost model)."""
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    n_layers = reader.fields[f"{arch}.block_count"].contents()
    d = reader.fields[f"{arch}.embedding_length"].contents()

    def per_layer(key: str) -> list[int]:
        value = reader.fields[f"{arch}.{key}"].contents()
        return value if isinstance(value, list) else [value] * n_layers

    heads, heads_kv = per_layer("attention.head_count"), per_layer("attention.head_count_kv")
    head_dim = d // max(heads)
    by_name = {t.name: t for t in reader.tensors}
    head = by_name.get("output.weight", by_name["token_embd.weight"])
    matrices = [t for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    body = sum(2 * int(np.prod(t.shape)) for t in matrices)

    def attention(keys: float) -> float:
        return sum(4 * h * head_dim * keys for h, hk in zip(heads, heads_kv, strict=True) if hk)

    keys_tg = (tg - 1) // 2 + 1
    kv = sum(2 * hk * head_dim * 2 for hk in heads_kv) * keys_tg
    weights = sum(int(t.n_bytes) for t in matrices) + int(head.n_bytes)
    return (
        body + attention((pp + 1) / 2),
        body + 2 * int(np.prod(head.shape)) + attention(keys_tg),
        weights + kv,
    )


@pytest.fixture(scope="module")
def exports(smollm2_gguf, smollm2_scored, tmp_path_factory):
    """SmolLM2 unpruned, 4 attention sublayers dropped and 4 mixed (``gatenorm export --to gguf``), 4 blocks
    dropped."""
    from typer.testing import CliRunner

    from gatenorm.cli import app

    work = tmp_path_factory.mktemp("bench-gguf")
    files = {}
    for label, args in {
        "0": ["--drop", "0"],
        "attn": ["--drop", "4"],
        "mixed": ["--drop", "4", "-m", "mixed"],
    }.items():
        files[label] = work / f"{label}.gguf"
        result = CliRunner().invoke(
            app, ["export", str(smollm2_gguf), *args, "--to", "gguf", "-o", str(files[label])]
        )
        assert result.exit_code == 0, result.output
    ckpt, scores = smollm2_scored
    blocks = make_plan(ckpt, scores, 4, action=LayerAction.DROP_BLOCK)
    files["blocks"] = export_gguf(ckpt, blocks, work / "blocks.gguf")
    return files


def test_bench_cost_is_the_cost_model_and_counts_the_files_tensors(bench, exports, smollm2_gguf):
    source = open_checkpoint(smollm2_gguf)
    base = bench.model_cost(exports["0"], PP, TG)
    for label, path in exports.items():
        pruned = open_checkpoint(path)
        assert (pruned.arch.name == "deci") == (label != "0"), label
        cost = bench.model_cost(path, PP, TG)
        plan = Plan.from_json(pruned.reader.fields["gatenorm.plan"].contents())
        actions = [lp.action for lp in plan.layers]
        assert math.isclose(cost.flops_pp, cost_model(source, PP).flops(actions), rel_tol=1e-9), label
        assert math.isclose(
            cost.flops_tg, cost_model(source, (TG - 1) // 2, "decode").compute(actions), rel_tol=1e-9
        )
        flops_pp, flops_tg, bytes_tg = counted(path, PP, TG)
        assert math.isclose(cost.flops_pp, flops_pp, rel_tol=1e-9), label
        assert math.isclose(cost.flops_tg, flops_tg, rel_tol=1e-9), label
        assert math.isclose(cost.bytes_tg, bytes_tg, rel_tol=1e-9), label
        if label != "0":
            assert cost.flops_pp < base.flops_pp and cost.bytes_tg < base.bytes_tg


def test_bench_refuses_a_file_whose_layers_do_not_match_its_plan(bench, exports, monkeypatch):
    ckpt = open_checkpoint(exports["attn"])
    monkeypatch.setattr(ckpt, "fixed_layers", {})
    with pytest.raises(SystemExit, match="do not match the plan"):
        bench.file_actions(ckpt)
