"""Healing: a closed-form, data-free repair of what a plan removes, fitted on calibration text.

`fit` fits each changed layer's `Repair` (ridge least squares of the output the layer lost on its normed
input, sequentially, in float64); `store` keeps the weights in a safetensors file beside the plan and
checks them against the hashes the plan records; every exporter and the PyTorch path read them from there.
"""
