"""ONNX Runtime Mobile packaging: the ORT-format model and the operator list for a reduced build."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from gatenorm.errors import GatenormError
from gatenorm.quiet import quiet

ORT_NAME = "model.ort"
REQUIRED_OPERATORS_NAME = "required_operators.config"


def write_mobile_package(onnx_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """Convert `onnx_path` with onnxruntime's ``convert_onnx_models_to_ort`` into `out_dir`.

    Writes ``model.ort`` (fixed optimizations for a generic ARM target, as ORT Mobile runs them) and
    ``required_operators.config`` (pass to ORT's ``build.py --include_ops_by_config`` for a reduced build).
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with tempfile.TemporaryDirectory(prefix="gatenorm-ort-", dir=out_dir.parent) as tmp:
        src = Path(tmp, "src")
        src.mkdir()
        os.link(onnx_path, src / onnx_path.name)  # the tool converts every .onnx in a folder
        data = onnx_path.with_name(onnx_path.name + "_data")
        if data.exists():
            os.link(data, src / data.name)
        dst = Path(tmp, "dst")
        try:
            with quiet("ort_format_model.utils"):
                convert_onnx_models_to_ort(
                    src / onnx_path.name,
                    output_dir=dst,
                    optimization_styles=[OptimizationStyle.Fixed],
                    target_platform="arm",
                )
        except Exception as e:  # onnxruntime reports conversion failures as bare exceptions
            raise GatenormError(f"ORT-format conversion failed: {e}") from None
        ort_files = list(dst.glob("*.ort"))
        configs = list(dst.glob("*.config"))
        if len(ort_files) != 1 or len(configs) != 1:
            found = sorted(p.name for p in dst.iterdir())
            raise GatenormError(f"ORT-format conversion wrote unexpected files: {found}")
        ort_path, config_path = out_dir / ORT_NAME, out_dir / REQUIRED_OPERATORS_NAME
        shutil.move(ort_files[0], ort_path)
        shutil.move(configs[0], config_path)
    return ort_path, config_path
