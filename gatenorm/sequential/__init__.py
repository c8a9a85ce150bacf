"""Layer-sequential execution: a checkpoint run one decoder layer at a time, so that calibration passes and
PyTorch validation of a 7-8B model hold one layer's weights, not the whole model's (docs/scale.md)."""

from gatenorm.sequential.model import SequentialModel, Windows

__all__ = ["SequentialModel", "Windows"]
