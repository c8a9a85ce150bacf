"""One transformers metadata parse per GGUF and process (`gatenorm.readers.hf_gguf`), and the GGUF tokenizer
converted once per model and cached on disk (`gatenorm.gguf_tokenizer`): equal to transformers' own results
(SmolLM2, tiny family GGUFs, a deci GGUF), parsed once for config + tensor map + tokenizer + model, a
damaged cache entry rebuilt."""

from __future__ import annotations

import contextlib
import json
from collections import OrderedDict

import gguf
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast
from transformers import modeling_gguf_pytorch_utils as hf

from exporters.export import export_gguf
from gatenorm import gguf_tokenizer
from gatenorm.apply import load_model, load_tokenizer
from gatenorm.plan import LayerAction
from gatenorm.readers import hf_gguf, open_checkpoint
from gatenorm.sequential import weights
from gatenorm.sequential.model import SequentialModel, _config
from tests.conftest import mixed_plan, tiny_hf

TEXT = "Hello world! The quick brown fox, 12345 lazy dogs.\n  Ünïcödé 日本語 <|im_start|>user\nHi<|im_end|>"


@pytest.fixture(scope="module")
def family_ggufs(tmp_path_factory, tokenizer_dir, tiny_gguf, smollm2_gguf) -> dict:
    """label -> GGUF: SmolLM2, the shipped tiny llama, qwen2 / qwen3 F32 exports and a deci export."""
    root = tmp_path_factory.mktemp("hf-gguf")
    files = {"smollm2": smollm2_gguf, "tiny": tiny_gguf}
    for family, overrides in {"qwen2": {}, "qwen3": {"head_dim": 16}}.items():
        folder = tiny_hf(root / family, tokenizer_dir, family, **overrides)
        plan = mixed_plan(open_checkpoint(folder), {}, {})
        files[family] = export_gguf(folder, plan, root / f"{family}.gguf", quant="F32")
    folder = tiny_hf(root / "deci-src", tokenizer_dir, "llama")
    plan = mixed_plan(open_checkpoint(folder), {0: LayerAction.DROP_ATTENTION}, {})
    files["deci"] = export_gguf(folder, plan, root / "deci.gguf", quant="F32")
    return files


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No parse kept from earlier tests, an empty tokenizer cache."""
    monkeypatch.setattr(hf_gguf, "_PARSED", OrderedDict())
    monkeypatch.setenv("GATENORM_CACHE", str(tmp_path / "cache"))


def _typed(value):
    """`value` with every leaf's type beside it (equality that tells 1 from 1.0 and True)."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return (type(value).__name__, value)


@pytest.mark.parametrize("label", ["smollm2", "tiny", "qwen2", "qwen3"])
def test_parse_equals_transformers_own(fresh, family_ggufs, label):
    path = family_ggufs[label]
    ours = hf_gguf.parsed_gguf(path)
    assert _typed(ours) == _typed(hf.load_gguf_checkpoint(str(path), return_tensors=False))
    ours["config"]["changed"] = True
    assert "changed" not in hf_gguf.parsed_gguf(path)["config"]  # each caller its own copy


def test_parse_is_redone_when_the_file_changes(fresh, tmp_path, smollm2_gguf):
    copy = tmp_path / "model.gguf"
    copy.write_bytes(smollm2_gguf.read_bytes())
    first = hf_gguf.parsed_gguf(copy)
    data = bytearray(copy.read_bytes())
    at = data.index(b"Smollm2 135M")  # general.name's value: same length, another name
    data[at : at + 7] = b"Otherlm"
    copy.write_bytes(bytes(data))
    assert hf_gguf.parsed_gguf(copy) != first


def test_config_and_tensor_map_equal_the_unshared_ones(fresh, monkeypatch, family_ggufs):
    path = family_ggufs["qwen3"]
    engine = SequentialModel(path)
    stock = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    assert _config(engine.ckpt).to_dict() == stock.to_dict()
    unshared_parse = lambda p: hf.load_gguf_checkpoint(str(p), return_tensors=False)  # noqa: E731
    monkeypatch.setattr(weights, "parsed_gguf", unshared_parse)
    monkeypatch.setattr(weights, "shared_gguf_parse", contextlib.nullcontext)  # stock name maps too
    unshared = weights.CheckpointTensors(engine.ckpt, engine.skeleton)
    assert engine.tensors.names == unshared.names and engine.tensors._mapping == unshared._mapping
    name = "model.layers.0.self_attn.q_proj.weight"  # q rows reordered by the tensor processor
    assert torch.equal(engine.tensors.read(name), unshared.read(name))


def test_one_metadata_parse_for_config_tensors_tokenizer_and_model(fresh, monkeypatch, smollm2_gguf):
    calls, name_maps = [], []
    original = hf.load_gguf_checkpoint

    def counted(path, return_tensors=False, **kwargs):
        calls.append(return_tensors)
        return original(path, return_tensors, **kwargs)

    build = gguf.TensorNameMap.__init__

    def counted_build(self, *args, **kwargs):
        name_maps.append(args)
        build(self, *args, **kwargs)

    monkeypatch.setattr(hf, "load_gguf_checkpoint", counted)
    monkeypatch.setattr(gguf.TensorNameMap, "__init__", counted_build)
    SequentialModel(smollm2_gguf)  # config + tensor map
    load_tokenizer(smollm2_gguf)  # converted (empty cache): the model type from the config
    load_model(smollm2_gguf)  # config, then the tensors
    assert calls.count(False) == 1
    assert calls.count(True) <= 1  # transformers' own read of the tensors, if it makes one
    # gguf-py's name map once per tensor mapping (the engine's, the model loader's), not once per module
    assert 1 <= len(name_maps) <= 2, len(name_maps)


@pytest.mark.parametrize("label", ["smollm2", "qwen3", "deci"])
def test_cached_tokenizer_gives_transformers_ids(fresh, monkeypatch, family_ggufs, label):
    path = family_ggufs[label]
    loader = PreTrainedTokenizerFast if label == "deci" else AutoTokenizer
    stock = loader.from_pretrained(path.parent, gguf_file=path.name)
    converted, cached = load_tokenizer(path), None

    def refused(*_args, **_kwargs):
        raise AssertionError("converted again: the cache was not used")

    monkeypatch.setattr(loader, "from_pretrained", _only_folders(loader.from_pretrained, refused))
    cached = load_tokenizer(path)
    for tokenizer in (converted, cached):
        assert type(tokenizer) is type(stock) and tokenizer.name_or_path == stock.name_or_path
        for special in (True, False):
            assert (
                tokenizer(TEXT, add_special_tokens=special)["input_ids"]
                == stock(TEXT, add_special_tokens=special)["input_ids"]
            )
        assert tokenizer.backend_tokenizer.to_str() == stock.backend_tokenizer.to_str()  # the whole pipeline
        assert tokenizer.all_special_ids == stock.all_special_ids and len(tokenizer) == len(stock)
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (stock.bos_token_id, stock.eos_token_id)


def _only_folders(load, refuse):
    """`load` for a folder (a cache entry), `refuse` for a GGUF (``gguf_file=``)."""

    def from_pretrained(*args, **kwargs):
        return refuse() if "gguf_file" in kwargs else load(*args, **kwargs)

    return from_pretrained


def _entry(tmp_path):
    (entry,) = (tmp_path / "cache" / "tokenizers").iterdir()
    return entry


@pytest.mark.parametrize("damage", ["altered", "unreadable", "no digest"])
def test_damaged_tokenizer_cache_entry_is_rebuilt(fresh, tmp_path, smollm2_gguf, damage):
    stock = load_tokenizer(smollm2_gguf)
    entry = _entry(tmp_path)
    tokenizer_json = entry / "tokenizer.json"
    if damage == "altered":  # still loads, but would give other ids: the digest refuses it
        data = json.loads(tokenizer_json.read_text())
        vocab = data["model"]["vocab"]
        a, b = vocab["Hello"], vocab["world"]
        vocab["Hello"], vocab["world"] = b, a
        tokenizer_json.write_text(json.dumps(data))
    elif damage == "unreadable":
        tokenizer_json.write_text("{not json")
    else:
        (entry / gguf_tokenizer.DIGEST).unlink()
    rebuilt = []
    ckpt = open_checkpoint(smollm2_gguf)

    def convert():
        rebuilt.append(True)
        return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)

    again = gguf_tokenizer.cached_tokenizer(smollm2_gguf, ckpt.reader.fields, False, convert)
    assert rebuilt and again(TEXT)["input_ids"] == stock(TEXT)["input_ids"]
    assert gguf_tokenizer._load(entry, False) is not None  # the entry was written again, whole
