"""Greedy generation with optimum's ORTModelForCausalLM, run by tests/test_onnx_clients.py in the Python of
optimum-onnx's own environment (it needs transformers 4.x): FOLDER FILE_NAME NEW_TOKENS PROMPT_IDS_JSON ->
the new token ids as JSON on the last line of stdout."""

from __future__ import annotations

import json
import sys


def main() -> None:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    folder, file_name, new_tokens, prompt = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        json.loads(sys.argv[4]),
    )
    model = ORTModelForCausalLM.from_pretrained(folder, subfolder="onnx", file_name=file_name)
    ids = torch.tensor([prompt])
    new = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
    )
    print(json.dumps(new[0, len(prompt) :].tolist()))


if __name__ == "__main__":
    main()
