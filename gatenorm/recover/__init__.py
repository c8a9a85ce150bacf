"""Recovery: a short distillation of a pruned (and healed) plan back toward the unpruned model, merged into
the weights.

`settings` holds the one settings model (`RecoverySettings`, the ``--recover-*`` flags and a recipe entry's
``recover:``); `lora` the low-rank adapters and their merge; `train` the distillation (KL of the student's
next-token distribution from the unpruned teacher's, on the model's own text by default); `store` the merged
tensors' file beside the plan, keyed by state-dict name and checked against the hashes the plan records.
Every consumer reads the merged tensors through `store.load_overrides`: `gatenorm.apply` (PyTorch, and the
ONNX and MLX exporters that write its model), `gatenorm.sequential.weights.CheckpointTensors` (an overlay by
state-dict name) and the GGUF writer (`exporters.gguf.from_gguf`).
"""
