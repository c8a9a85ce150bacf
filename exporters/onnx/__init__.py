"""ONNX export of pruned models for onnxruntime (desktop and Mobile), and a runner for the exports."""

from exporters.onnx.export import export_onnx
from exporters.onnx.precision import Precision
from exporters.onnx.runner import KVState, OnnxRunner

__all__ = ["KVState", "OnnxRunner", "Precision", "export_onnx"]
