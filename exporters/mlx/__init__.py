"""MLX export: pruned models as folders that mlx-lm runs as they are (``mlx_lm.load``, ``mlx_lm.generate``).

mlx and mlx-lm are the optional extra ``gatenorm[mlx]``: nothing here imports them at module level."""

from __future__ import annotations

USAGE = """```bash
mlx_lm.generate --model {folder} --prompt "Hello" --max-tokens 32
```

```python
from mlx_lm import load, generate

model, tokenizer = load("{folder}")
print(generate(model, tokenizer, prompt="Hello", max_tokens=32))
```

The folder uses mlx-lm's `nemotron-nas` model (per-layer `block_configs`): a dropped attention has no
tensors and its KV cache stays empty, a linearized one is one `d x d` matrix. mlx-lm >= 0.29.1 runs it with
no patch (`pip install mlx-lm`; on Linux `pip install "mlx[cpu]" mlx-lm`)."""


def usage(folder: str) -> str:
    """The model card's "Use" section for an MLX folder named `folder`."""
    return USAGE.format(folder=folder)
