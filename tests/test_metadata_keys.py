"""One spelling of the plan metadata in every export format (`exporters.keys`), and files written with the
older spellings still read."""

from __future__ import annotations

import json

import pytest

from exporters.gguf.metadata import plan_metadata as gguf_plan_metadata
from exporters.gguf.metadata import read_gguf_metadata, read_plan_metadata
from exporters.keys import Keys, canonical, plan_values
from exporters.onnx.metadata import plan_from_metadata, read_metadata
from exporters.onnx.metadata import plan_metadata as onnx_plan_metadata
from gatenorm import __version__
from gatenorm.methods import make_method_plan
from gatenorm.models import tiny
from gatenorm.readers import open_checkpoint


@pytest.fixture(scope="module")
def plan():
    return make_method_plan(open_checkpoint(tiny()), "gate-norm", 1)


def test_both_formats_write_the_same_plan_keys(plan):
    gguf_keys = gguf_plan_metadata(plan)
    onnx_props = onnx_plan_metadata(plan, "fp32")
    assert set(gguf_keys) == set(plan_values(plan)) == set(onnx_props) - {Keys.KV_LAYERS, Keys.PRECISION}
    decoded = read_metadata(onnx_props)
    for key, (value, _type, _sub) in gguf_keys.items():
        assert decoded[key] == (value if key != Keys.BUDGET else str(value)), key
    assert Keys.Source.SHA256 in gguf_keys and decoded[Keys.Source.SHA256] == plan.source.sha256
    # a list is written only when the plan uses its action, in both formats
    assert plan.dropped and not plan.linearized
    assert Keys.DROPPED_LAYERS in onnx_props and Keys.LINEARIZED_LAYERS not in onnx_props
    assert Keys.LINEARIZED_LAYERS not in gguf_keys


def test_onnx_metadata_written_the_old_way_still_reads(plan):
    # metadata_props exactly as gatenorm wrote them before the keys were shared
    old = {
        "gatenorm.plan": plan.model_dump_json(),
        "gatenorm.method": plan.method,
        "gatenorm.dropped_layers": json.dumps(plan.dropped),
        "gatenorm.linearized_layers": "[]",
        "gatenorm.linearize_alphas": "[]",
        "gatenorm.dropped_blocks": "[]",
        "gatenorm.kv_layers": json.dumps(plan.kv_layers),
        "gatenorm.source_sha256": plan.source.sha256,
        "gatenorm.tool_version": __version__,
        "gatenorm.precision": "fp32",
    }
    meta = read_metadata(old)
    assert meta[Keys.Source.SHA256] == plan.source.sha256 and "gatenorm.source_sha256" not in meta
    assert meta[Keys.DROPPED_LAYERS] == plan.dropped and meta[Keys.LINEARIZED_LAYERS] == []
    assert plan_from_metadata(old) == plan
    assert canonical({"gatenorm.source_sha256": "old", Keys.Source.SHA256: "new"}) == {
        Keys.Source.SHA256: "new"
    }


def test_gguf_export_carries_the_shared_keys(plan, tmp_path):
    from exporters.export import export_gguf

    out = export_gguf(tiny(), plan, tmp_path / "t.gguf", quant="keep")
    meta = read_gguf_metadata(out)
    values = plan_values(plan)
    assert {k for k in meta if k.startswith(Keys.PREFIX)} == set(values)
    assert meta[Keys.Source.SHA256] == plan.source.sha256 and meta[Keys.DROPPED_LAYERS] == plan.dropped
    assert read_plan_metadata(out) == plan
