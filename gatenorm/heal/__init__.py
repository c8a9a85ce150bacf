"""Healing: a closed-form, data-free repair of what a plan removes, fitted on calibration text.

`fit` fits the repairs (ridge least squares of the output each changed layer lost, sequentially, in
float64): a fold into the down projection of the MLP below (`Refit`, no run-time cost) or a fitted map of
the layer's normed input (`Repair`, one d x d matmul); `forms` says which layers get which; `store` keeps
the weights in a safetensors file beside the plan and checks them against the hashes the plan records;
every exporter and the PyTorch path read them from there.
"""
