"""How gatenorm loads a GGUF in llama.cpp: its weights used where the file maps them.

llama.cpp's CPU backend repacks the matrices of some types (Q4_0, Q4_K, IQ4_NL, ...) into an "extra"
buffer of interleaved rows when the model loads: a second, anonymous copy of them, as large as the file,
beside the mapped file (a 4.2 GiB Llama-3-8B-shaped Q4_K file: 8.3 GiB resident instead of 4.2). gatenorm
turns that off (``use_extra_bufts``), so sampling synthetic text and validating in llama.cpp hold about
the file's size, as the laptop-scale targets ask (docs/scale.md); the matmuls then run on the stored
layout, which is slower where the repacked kernels apply. Timings (`gatenorm.validate.bench`) load the
model as stock llama.cpp does, repacked: the speed users get.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock


def model_params():
    """llama.cpp's default model parameters, without the repacked copy of the weights."""
    import llama_cpp

    return _without_repack(llama_cpp.llama_model_default_params())


def _without_repack(params):
    params.use_extra_bufts = False
    return params


@contextlib.contextmanager
def weights_in_place() -> Iterator[None]:
    """llama-cpp-python's `Llama` made inside the block loads its model with `model_params` (it has no
    argument for it: its module's default parameters are swapped for the block)."""
    import llama_cpp.llama as high_level

    bindings = high_level.llama_cpp
    stock = bindings.llama_model_default_params
    with mock.patch.object(bindings, "llama_model_default_params", lambda: _without_repack(stock())):
        yield
