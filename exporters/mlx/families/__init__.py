"""Per-family specs of the MLX exporter (`base.MlxSpec`, the llama-like default), one module per family
group, imported here so that each registers itself."""

from exporters.mlx.families import granite, llama, own, phi3, qwen2, refused  # noqa: F401  (they register)
from exporters.mlx.families.base import SPECS, MlxSpec, Refused, Scales, mlx_family, register_mlx_family

__all__ = ["SPECS", "MlxSpec", "Refused", "Scales", "mlx_family", "register_mlx_family"]
