"""Runtimes that run a model for validation: `base` (the protocol, batching, the table, detection) and one
module per runtime, each registering its class and claiming the paths it opens (mergekit's pattern: the
modules are imported here, at the top). A new runtime is one module with a `@register_runtime` class, and
one import line below.
"""

from gatenorm.validate.runtimes.base import (
    RUNTIMES,
    BatchLogitsRuntime,
    ModelSpec,
    Request,
    Runtime,
    Timing,
    continuation_scores,
    detect_runtime,
    model_spec,
    open_runtime,
    register_runtime,
    truncate_left,
)
from gatenorm.validate.runtimes.llamacpp import LlamaCppRuntime
from gatenorm.validate.runtimes.mlx import MlxRuntime, is_mlx_folder
from gatenorm.validate.runtimes.ort import OnnxRuntime, is_onnx_folder
from gatenorm.validate.runtimes.pytorch import TorchRuntime

__all__ = [
    "RUNTIMES",
    "BatchLogitsRuntime",
    "LlamaCppRuntime",
    "MlxRuntime",
    "ModelSpec",
    "OnnxRuntime",
    "Request",
    "Runtime",
    "Timing",
    "TorchRuntime",
    "continuation_scores",
    "detect_runtime",
    "is_mlx_folder",
    "is_onnx_folder",
    "model_spec",
    "open_runtime",
    "register_runtime",
    "truncate_left",
]
