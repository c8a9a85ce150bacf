"""Reference logits of the ONNX exports of every family x action, recorded from the traced exporter
(optimum + fused attention, the exporter before the graph builder) as ``tests/data/onnx_traced_logits.npz``.

Each case is a tiny seeded checkpoint (`test_onnx_export`'s families) and a plan: ``keep`` (every layer),
``mixed`` (layer 0 linearized with alpha 0.5, 1 without attention, 2 kept, 3 dropped whole) and ``healed``
(the mixed actions with random linear repairs with biases, and refitted down projections of layers 1 and 2
where the family's MLP output joins the residual linearly). The logits are those of a fixed prompt (every
position) and of 4 cached decode steps of fixed tokens. They were recorded with the traced exporter of
commit f063592 (the builder replaced it in the next commits): rebuild them from a checkout of it, e.g.
``PYTHONPATH=<checkout of f063592> python tests/onnx_reference.py`` (run from any folder; with today's
exporters the script records the builder's logits instead).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import make_tiny_model, mixed_plan
from test_onnx_export import FAMILY_ARCHS, IDS, TINY_ARCHS, TINY_MIXED

from gatenorm.apply import load_model
from gatenorm.architectures import get_architecture
from gatenorm.heal.store import LinearRepair, healed, save_repairs, weights_path_for
from gatenorm.methods import score_checkpoint
from gatenorm.plan import Healing, Plan, make_plan
from gatenorm.readers import open_checkpoint

DATA = Path(__file__).parent / "data" / "onnx_traced_logits.npz"
PROMPT = np.random.default_rng(5).integers(3, 128, (1, 7))
DECODE = np.random.default_rng(6).integers(3, 128, 4)
PLANS = ("keep", "mixed", "healed")
#: case name -> (model_type, config overrides): the families of `test_onnx_export`
CASES = {f"tiny-{name}": (name.split("-")[0], dict(o)) for name, o in TINY_ARCHS.items()} | {
    name: (name.split("-")[0], IDS | o) for name, o in FAMILY_ARCHS.items()
}


def build_checkpoint(case: str, folder: Path) -> Path:
    """The seeded tiny checkpoint of `case` (as the export tests build it) in `folder`."""
    model_type, overrides = CASES[case]
    make_tiny_model(folder, model_type, seed=1, **overrides)
    return folder


def build_plan(kind: str, folder: Path, work: Path) -> Plan:
    """Plan `kind` (see the module doc) for the checkpoint in `folder`; a healed plan's weights in `work`."""
    ckpt = open_checkpoint(folder)
    if kind == "keep":
        return make_plan(ckpt, score_checkpoint(ckpt, "gate-norm"), 0, False)
    plan = mixed_plan(ckpt, TINY_MIXED, {0: 0.5})
    if kind == "mixed":
        return plan
    g = torch.Generator().manual_seed(3)
    d = ckpt.shape.d_model
    repairs = {
        i: LinearRepair(0.05 * torch.randn(d, d, generator=g), 0.1 * torch.randn(d, generator=g))
        for i in sorted(TINY_MIXED)
    }
    refits = {}
    arch = get_architecture(ckpt.arch.name)
    if not arch.fold_refusal():
        model = load_model(folder)
        for i in (1, 2):
            w = arch.down_projection(arch.decoder_layers(model)[i]).weight.detach()
            refits[i] = w + 0.1 * w.abs().mean() * torch.randn(w.shape, generator=g)
    weights = weights_path_for(work / "plan.json")
    save_repairs(weights, repairs, refits)
    form = {"form": "fold", "fold_ridge": 1.0} if refits else {}
    info = Healing(calib="synthetic", samples=2, length=16, ridge=0.0, weights=str(weights), **form)
    return healed(plan, repairs, info, refits)


def logits_of(folder: Path) -> np.ndarray:
    """[len(PROMPT) + len(DECODE), vocab]: every prompt position, then each cached decode step."""
    from exporters.onnx.runner import OnnxRunner

    runner = OnnxRunner(folder)
    rows = [runner.logits(PROMPT)[0]]
    state = runner.prefill(PROMPT)
    rows += [runner.decode(state, [int(t)]).copy() for t in DECODE]
    return np.concatenate([rows[0], np.stack([r[0] for r in rows[1:]])])


def record() -> None:
    from exporters.onnx import export_onnx

    found = {}
    with tempfile.TemporaryDirectory(prefix="gatenorm-onnx-ref-") as tmp:
        for case in CASES:
            folder = build_checkpoint(case, Path(tmp) / case)
            for kind in PLANS:
                work = Path(tmp) / f"{case}-{kind}"
                work.mkdir()
                plan = build_plan(kind, folder, work)
                out = export_onnx(folder, plan, work / "onnx")
                found[f"{case}/{kind}"] = logits_of(out)
                print(case, kind, found[f"{case}/{kind}"].shape, flush=True)
    DATA.parent.mkdir(exist_ok=True)
    np.savez_compressed(DATA, **found)


if __name__ == "__main__":
    record()
