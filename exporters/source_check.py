"""Does a plan belong to the checkpoint about to be exported? A plan names the checkpoint it was made for."""

from __future__ import annotations

from gatenorm.architectures import get_architecture
from gatenorm.errors import GatenormError
from gatenorm.plan import Plan
from gatenorm.readers import Checkpoint, ContentHash


def verify_plan_shape(plan: Plan, ckpt: Checkpoint) -> None:
    """Refuse `plan` unless it is for `ckpt`'s architecture and layer count (instant)."""
    src = plan.source
    if get_architecture(src.architecture).name != ckpt.arch.name:
        raise GatenormError(f"the plan is for a {src.architecture} model, {ckpt.path} is {ckpt.arch.name}")
    if src.n_layers != ckpt.shape.n_layers:
        raise GatenormError(
            f"the plan is for a {src.n_layers}-layer model, {ckpt.path} has {ckpt.shape.n_layers} layers"
        )


def verify_plan_content(plan: Plan, ckpt: Checkpoint) -> None:
    """Refuse `plan` unless `ckpt` has the content hash the plan recorded.

    That is the raw q/k bytes of every layer (``attention-tensors``: reads them), or the model shape for
    methods that read no weights (``shape``).
    """
    src = plan.source
    if src.hashed == "attention-tensors":
        actual = ckpt.attention_sha256(("q", "k"))
    else:
        actual = ContentHash.of_shape(ckpt.shape).hexdigest()
    if actual != src.sha256:
        raise GatenormError(
            f"the plan was made for {src.path} ({src.format}, {src.hashed} sha256 {src.sha256[:12]}...), "
            f"not for {ckpt.path} (sha256 {actual[:12]}...): make a plan for this model"
        )


def verify_plan_source(plan: Plan, ckpt: Checkpoint) -> None:
    """Refuse `plan` unless it was made for `ckpt`: same architecture, layer count and content hash."""
    verify_plan_shape(plan, ckpt)
    verify_plan_content(plan, ckpt)
