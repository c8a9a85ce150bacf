"""Hub ids as model names (`gatenorm.hub`), offline: every command run on ``org/name`` and
``org/name:FILE.gguf`` from a Hugging Face cache the tests write (HF_HOME, HF_HUB_OFFLINE=1), never the
network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_hf

from exporters.gguf.metadata import read_plan_metadata
from gatenorm.hub import HubId, parse_hub_id
from gatenorm.plan import Plan

GGUF_REPO, GGUF_SHA = "gn-test/smollm2-gguf", "a1" * 20
HF_REPO, HF_SHA = "gn-test/tiny-llama", "b2" * 20
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _cache_repo(hub: Path, repo: str, sha: str, files: dict[str, Path]) -> None:
    """One repository in huggingface_hub's cache layout: refs/main names the commit, the snapshot holds the
    files (links to blobs, as huggingface_hub writes them)."""
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    snapshot = root / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    for i, (name, source) in enumerate(files.items()):
        blob = root / "blobs" / f"{i:040x}"
        shutil.copy(source, blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, smollm2_gguf, tokenizer_dir) -> Path:
    """HF_HOME with SmolLM2's GGUF (GGUF_REPO) and a tiny llama folder with a tokenizer (HF_REPO)."""
    home = tmp_path_factory.mktemp("hf-home")
    folder = tiny_hf(tmp_path_factory.mktemp("tiny-hub-llama"), tokenizer_dir, "llama")
    _cache_repo(home / "hub", GGUF_REPO, GGUF_SHA, {SMOLLM2_FILE: smollm2_gguf})
    _cache_repo(home / "hub", HF_REPO, HF_SHA, {f.name: f for f in folder.iterdir()})
    return home


def _run(hf_home: Path, *args, cwd: Path, module: str = "gatenorm.cli") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env
    )


def test_parse_hub_id():
    assert parse_hub_id("Qwen/Qwen3-0.6B") == HubId("Qwen/Qwen3-0.6B")
    assert parse_hub_id("Qwen/Qwen3-0.6B@main") == HubId("Qwen/Qwen3-0.6B", "main")
    assert parse_hub_id("org/repo:sub/m.Q4_K_M.gguf") == HubId("org/repo", None, "sub/m.Q4_K_M.gguf")
    assert parse_hub_id("org/repo@v1:m.gguf") == HubId("org/repo", "v1", "m.gguf")
    assert str(HubId("org/repo", "v1", "m.gguf")) == "org/repo@v1:m.gguf"
    for path in (
        "smollm2",
        "model.gguf",
        "models/x.gguf",
        "./org/name",
        "/abs/org/name",
        "a/b/c",
        "a/b:c.txt",
    ):
        assert parse_hub_id(path) is None, path


def test_score_plan_export_validate_from_hub_ids(tmp_path, hf_home):
    gguf_id = f"{GGUF_REPO}:{SMOLLM2_FILE}"
    r = _run(hf_home, "score", gguf_id, "--json", "s.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    model = Path(json.loads((tmp_path / "s.json").read_text())["model"])
    assert model.parts[-3:] == ("snapshots", GGUF_SHA, SMOLLM2_FILE)

    r = _run(hf_home, "plan", gguf_id, "--drop", "2", "-o", "g.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert Plan.load(tmp_path / "g.json").source.hub.model_dump() == {
        "repo": GGUF_REPO, "file": SMOLLM2_FILE, "revision": GGUF_SHA,
    }  # fmt: skip

    r = _run(hf_home, "plan", HF_REPO, "--drop", "1", "--method", "random", "-o", "p.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    plan = Plan.load(tmp_path / "p.json")
    assert plan.source.hub.model_dump() == {"repo": HF_REPO, "file": None, "revision": HF_SHA}
    assert plan.source.format == "safetensors" and Path(plan.source.path).name == HF_SHA

    r = _run(
        hf_home, "export", f"{HF_REPO}@main", "--plan", "p.json", "--to", "gguf", "-o", "t.gguf", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t.gguf").stat().st_size > 0

    r = _run(hf_home, "export", HF_REPO, "--drop", "1", "--method", "random", "-o", "d.gguf", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert read_plan_metadata(tmp_path / "d.gguf").source.hub.revision == HF_SHA

    args = ["--runtime", "torch", "--candidate-plan", "p.json", "--tasks", "none", "--ctx", "32"]
    r = _run(
        hf_home, "validate", HF_REPO, HF_REPO, *args, "--max-tokens", "64", "--json", "v.json", cwd=tmp_path
    )
    assert r.returncode in (0, 1), r.stderr  # 1: a gate failed, which random weights may
    assert json.loads((tmp_path / "v.json").read_text())["agreement"]["kld_mean"] > 0


def test_local_path_wins_and_keeps_its_plan_unchanged(tmp_path, hf_home, tiny_llama_dir):
    """A folder named like a hub id is used as it is; a plan of a local model has no hub entry at all."""
    shutil.copytree(tiny_llama_dir, tmp_path / HF_REPO)
    r = _run(hf_home, "plan", HF_REPO, "--drop", "1", "--method", "random", "-o", "p.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "p.json").read_text())
    assert "hub" not in doc["source"] and doc["source"]["path"] == HF_REPO


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ("gn-test/missing", "gn-test/missing is not in the Hugging Face cache and HF_HUB_OFFLINE is set"),
        (f"{GGUF_REPO}:other.gguf", f"{GGUF_REPO} (other.gguf) is not in the Hugging Face cache"),
        (f"{HF_REPO}@v9", "is not in the Hugging Face cache and HF_HUB_OFFLINE is set"),
        (GGUF_REPO, f"{GGUF_REPO} holds no transformers model (no config.json)"),
    ],
)
def test_missing_hub_model_is_one_line(tmp_path, hf_home, model, says):
    r = _run(hf_home, "score", model, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list(tmp_path.iterdir())


def test_recipe_sources_resolve_hub_ids(tmp_path, hf_home):
    """Recipes take the same names (a path entry spelling a hub id, or a hub entry) and record the commit."""
    code = (
        "from gatenorm.recipes.schema import ModelEntry\n"
        "from gatenorm.recipes.sources import resolve_source\n"
        f"a = resolve_source(ModelEntry(path={HF_REPO!r}))\n"
        f"b = resolve_source(ModelEntry(hub={GGUF_REPO!r}, file={SMOLLM2_FILE!r}))\n"
        "print(a.name, a.hub.revision, a.path.name, b.name, b.hub.revision, b.is_gguf)\n"
    )
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["tiny-llama", HF_SHA, HF_SHA, "SmolLM2-135M-Instruct.Q4_1", GGUF_SHA, "True"]
