"""Export targets: `base` (what a target declares, the table) and one module per target, imported here at
the top so that importing the package registers them all. A new target is one module calling
`register_target`, and one import line below."""

from exporters.targets import gguf, mlx, onnx  # noqa: F401  (the target modules register themselves)
from exporters.targets.base import (
    TARGETS,
    ExportTarget,
    export_flags_model,
    register_target,
    target_spec,
    unregister_target,
)

__all__ = [
    "TARGETS",
    "ExportTarget",
    "export_flags_model",
    "register_target",
    "target_spec",
    "unregister_target",
]
