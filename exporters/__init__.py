"""Exporters that rewrite a model according to a gatenorm plan (GGUF, ONNX)."""
