"""Synthetic calibration text: windows sampled by llama.cpp from the model itself (LLM-QAT's data-free
calibration), cached per model content and settings.

llama.cpp runs the GGUF (an HF folder is first written to a temporary F16 GGUF by gatenorm's own writer,
`exporters.gguf.from_hf`, under a neutral name: llama.cpp keys vocabulary fixes on the model's name, e.g.
a Phi-3's special tokens, which a folder named ``phi3`` with another vocabulary lacks), several sequences
in one ``llama_batch`` (one sequence id each), so each step reads the weights once for all of them. An HF
folder whose family llama.cpp's graph cannot run as written (`llama_cpp_refusal`: a Gemma-2 with an
untied LM head) is sampled by transformers instead, the whole float32 model loaded (`torch_windows`;
small models: `gatenorm.sequential.budget` refuses one that does not fit `--max-memory`).

The rules: BOS (when the tokenizer puts one first), a uniformly drawn non-special token, then plain
softmax sampling at temperature 1 (no top-k / top-p) with every end-of-generation token suppressed, so
that every window is full length. Each window draws from its own generator seeded by (seed, window
index): same seed, same text, however the windows are grouped.

The windows are stored under the user cache (``$GATENORM_CACHE``, else ``$XDG_CACHE_HOME/gatenorm``, else
``~/.cache/gatenorm``) in ``synthetic/<key>.npy``, `key` the sha256 of the model's content, the settings
and the sampler's version, written atomically.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from gatenorm.errors import GatenormError
from gatenorm.io import atomic_path, cache_dir, content_sha256, scratch_file
from gatenorm.llamacpp import model_params

#: Bumped when the sampling rules change: older cached windows are then not reused.
SAMPLER_SCHEMA = 1
#: llama.cpp's KV cache is kept under this many bytes: the windows are sampled in groups that fit.
KV_BUDGET = 512 << 20
#: general.name of the temporary GGUF of an HF folder (llama.cpp matches model names, e.g. "phi3").
SAMPLING_NAME = "gatenorm-synthetic-text"


def sampler_id(model_path: str | Path | None = None) -> str:
    """The generator a plan records of `model_path`'s text: ``llama.cpp (llama-cpp-python <version>)``, or
    ``transformers <version> (float32 PyTorch)`` where llama.cpp cannot host it (`llama_cpp_refusal`)."""
    return _sampler_name(model_path is not None and llama_cpp_refusal(Path(model_path)) is not None)


def _sampler_name(refused: bool) -> str:
    """`sampler_id` once it is known whether llama.cpp refuses the model."""
    if refused:
        import transformers

        return f"transformers {transformers.__version__} (float32 PyTorch)"
    import llama_cpp

    return f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"


def llama_cpp_refusal(model_path: Path) -> str | None:
    """Why llama.cpp cannot sample `model_path` (None: it can): a GGUF it runs as is; an HF folder as
    gatenorm's writer makes a GGUF of it (its family's GGUF spec, `hf_refusal`)."""
    from exporters.gguf.families import gguf_family
    from gatenorm.readers import open_checkpoint

    if model_path.is_file():
        return None
    ckpt = open_checkpoint(model_path)
    return gguf_family(ckpt.arch).hf_refusal(ckpt)


@contextlib.contextmanager
def _silent_llama() -> Iterator[None]:
    """llama.cpp's log dropped while the block runs, llama-cpp-python's own callback back after."""
    import llama_cpp
    import llama_cpp._logger as stock

    @llama_cpp.llama_log_callback
    def drop(_level: int, _text: bytes, _user_data: ctypes.c_void_p) -> None:
        pass

    llama_cpp.llama_log_set(drop, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(stock.llama_log_callback, ctypes.c_void_p(0))


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class _LlamaSampler:
    """One GGUF loaded in llama.cpp, with a context of `n_seq` sequences of `length` tokens."""

    def __init__(self, gguf: Path, n_seq: int, length: int):
        import llama_cpp as ll

        self.ll = ll
        ll.llama_backend_init()
        self.model = ll.llama_model_load_from_file(str(gguf).encode(), model_params())
        if not self.model:
            raise GatenormError(f"llama.cpp cannot load {gguf} to sample synthetic calibration text")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self.vocab))
        self.n_seq, self.length = n_seq, length
        ctx_params = ll.llama_context_default_params()
        per_seq = -(-length // 256) * 256
        ctx_params.n_ctx = per_seq * n_seq
        ctx_params.n_batch = ctx_params.n_ubatch = max(2 * n_seq, 1)
        ctx_params.n_seq_max = n_seq
        ctx_params.n_threads = ctx_params.n_threads_batch = _threads()
        self.ctx = ll.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            ll.llama_model_free(self.model)
            raise GatenormError(f"llama.cpp cannot make a context of {n_seq} x {length} tokens for {gguf}")
        self.batch = ll.llama_batch_init(2 * n_seq, 0, 1)

    def eog(self) -> np.ndarray:
        """The vocabulary's end-of-generation token ids."""
        return np.array([t for t in range(self.n_vocab) if self.ll.llama_vocab_is_eog(self.vocab, t)], int)

    def decode(self, rows: list[list[int]], start: int) -> np.ndarray:
        """Feed sequence s the tokens rows[s] at positions start, start + 1, ...; the float32 logits of
        each sequence's last token [n, n_vocab]."""
        b, i = self.batch, 0
        for s, tokens in enumerate(rows):
            for k, token in enumerate(tokens):
                b.token[i], b.pos[i], b.n_seq_id[i] = token, start + k, 1
                b.seq_id[i][0] = s
                b.logits[i] = k == len(tokens) - 1
                i += 1
        b.n_tokens = i
        if (code := self.ll.llama_decode(self.ctx, b)) != 0:
            raise GatenormError(f"llama.cpp failed to decode the synthetic text (code {code})")
        logits = self.ll.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(logits, shape=(len(rows), self.n_vocab)).copy()

    def reset(self) -> None:
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


def _gguf_facts(gguf: Path) -> tuple[int, int]:
    """(tokens in the vocabulary, bytes llama.cpp's F16 KV cache takes per token of one sequence)."""
    from gatenorm.readers import open_checkpoint

    ckpt = open_checkpoint(gguf)
    shape = ckpt.shape
    n_vocab = ckpt.reader.fields["tokenizer.ggml.tokens"].count
    return n_vocab, shape.n_layers * 2 * shape.n_head_kv * shape.head_dim * 2


def _sample_token(logits: np.ndarray, banned: np.ndarray, rng: np.random.Generator) -> int:
    """A token drawn from softmax(logits) (float64), `banned` ids excluded."""
    z = logits.astype(np.float64)
    z[banned] = -np.inf
    p = np.exp(z - z.max())
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def llama_windows(
    gguf: Path,
    prefixes: np.ndarray,
    length: int,
    seed: int,
    kv_bytes: int,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Windows [n, length] sampled by llama.cpp from `gguf`, window s continuing ``prefixes[s]``
    (BOS and the first token) with tokens drawn by ``np.random.default_rng((seed, s))``, end of
    generation suppressed, in groups of windows whose KV cache (`kv_bytes` per token) fits `KV_BUDGET`;
    `progress(done, total)` after each step of a group."""
    n, first = prefixes.shape
    out = np.zeros((n, length), dtype=np.int64)
    out[:, :first] = prefixes[:, :length]
    if first >= length:
        return out
    group = max(1, min(n, 256, KV_BUDGET // max(kv_bytes * length, 1)))
    rngs = [np.random.default_rng((seed, s)) for s in range(n)]
    with _silent_llama():
        sampler = _LlamaSampler(gguf, group, length)
        try:
            banned = sampler.eog()
            steps = -(-n // group) * (length - first)
            done = 0
            for lo in range(0, n, group):
                rows = range(lo, min(lo + group, n))
                sampler.reset()
                logits = sampler.decode([[int(t) for t in out[s, :first]] for s in rows], 0)
                for pos in range(first, length):
                    for k, s in enumerate(rows):
                        out[s, pos] = _sample_token(logits[k], banned, rngs[s])
                    if pos + 1 < length:
                        logits = sampler.decode([[int(out[s, pos])] for s in rows], pos)
                    done += 1
                    if progress is not None:
                        progress(done, steps)
        finally:
            sampler.close()
    return out


def torch_windows(
    model_path: Path,
    prefixes: np.ndarray,
    length: int,
    seed: int,
    eog: np.ndarray,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Windows [n, length] sampled by transformers from the whole float32 model of `model_path`, with
    `llama_windows`' rules (each window continues ``prefixes[s]`` with tokens drawn by
    ``np.random.default_rng((seed, s))``, `eog` ids suppressed), all windows in one batch, its KV cache
    reused from step to step."""
    import torch

    from gatenorm.apply import load_model
    from gatenorm.quiet import quiet_transformers

    n, first = prefixes.shape
    out = np.zeros((n, length), dtype=np.int64)
    out[:, :first] = prefixes[:, :length]
    if first >= length:
        return out
    rngs = [np.random.default_rng((seed, s)) for s in range(n)]
    model = load_model(model_path)
    with torch.inference_mode(), quiet_transformers():
        result = model(input_ids=torch.from_numpy(out[:, :first]), use_cache=True, logits_to_keep=1)
        for pos in range(first, length):
            logits = result.logits[:, -1].float().numpy()
            out[:, pos] = [_sample_token(logits[s], eog, rngs[s]) for s in range(n)]
            if pos + 1 < length:
                step = torch.from_numpy(out[:, pos : pos + 1])
                result = model(input_ids=step, past_key_values=result.past_key_values, use_cache=True)
            if progress is not None:
                progress(pos + 1 - first, length - first)
    return out


def _banned(tokenizer, config: dict) -> np.ndarray:
    """What transformers' sampling suppresses: the config's end-of-sequence ids and every special token of
    the tokenizer (llama.cpp's end-of-generation set also counts control tokens found by their text)."""
    eos = config.get("eos_token_id")
    ids = set(tokenizer.all_special_ids) | set(
        eos if isinstance(eos, list) else [eos] if eos is not None else []
    )
    return np.array(sorted(ids), dtype=int)


def _prefixes(tokenizer, n_vocab: int, samples: int, bos: int | None, seed: int) -> np.ndarray:
    """Per window: BOS (if any) and a first token drawn uniformly from the non-special ids."""
    special = set(tokenizer.all_special_ids)
    allowed = np.array([i for i in range(n_vocab) if i not in special])
    first = allowed[np.random.default_rng(seed).integers(len(allowed), size=(samples, 1))]
    return first if bos is None else np.concatenate([np.full((samples, 1), bos), first], axis=1)


@contextlib.contextmanager
def _as_gguf(model_path: Path, beside: Path) -> Iterator[Path]:
    """`model_path` itself when it is a GGUF, else a temporary F16 GGUF of the HF folder beside `beside`."""
    from exporters.gguf.from_hf import hf_to_gguf
    from gatenorm.readers import open_checkpoint

    if model_path.is_file():
        yield model_path
        return
    with scratch_file(beside, "f16") as tmp:
        hf_to_gguf(open_checkpoint(model_path), tmp, "F16", name=SAMPLING_NAME)
        yield tmp


@contextlib.contextmanager
def _bar(what: str) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar on a terminal's stderr (nothing elsewhere); yields `progress(done, total)`."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)
    columns = ("{task.description}", BarColumn(), "{task.completed}/{task.total}", TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def synthetic_windows(
    model_path: str | Path,
    tokenizer,
    samples: int,
    length: int,
    bos: int | None,
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
) -> np.ndarray:
    """`samples` windows of `length` tokens sampled from `model_path` by llama.cpp (module doc), from the
    cache when the same model, settings and sampler made them before."""
    import llama_cpp

    from gatenorm.readers import open_checkpoint

    model_path = Path(model_path)
    reason = llama_cpp_refusal(model_path)
    key = hashlib.sha256(
        json.dumps(
            {
                "schema": SAMPLER_SCHEMA,
                "model": content_sha256(model_path),
                "samples": samples,
                "length": length,
                "bos": bos,
                "seed": seed,
                "sampler": llama_cpp.__version__ if reason is None else _sampler_name(True),
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    stored = cache_dir() / "synthetic" / f"{key}.npy"
    with contextlib.suppress(OSError, ValueError):
        windows = np.load(stored)
        if windows.shape == (samples, length):
            return windows
    stored.parent.mkdir(parents=True, exist_ok=True)
    if reason is not None:
        log(f"sampling {samples} x {length} synthetic calibration tokens with transformers ({reason})")
        with _bar("sampling synthetic text") as progress:
            config = open_checkpoint(model_path).config
            prefixes = _prefixes(tokenizer, int(config["vocab_size"]), samples, bos, seed)
            windows = torch_windows(model_path, prefixes, length, seed, _banned(tokenizer, config), progress)
    else:
        log(f"sampling {samples} x {length} synthetic calibration tokens with llama.cpp")
        with _as_gguf(model_path, stored) as gguf, _bar("sampling synthetic text") as progress:
            n_vocab, kv_bytes = _gguf_facts(gguf)
            prefixes = _prefixes(tokenizer, n_vocab, samples, bos, seed)
            windows = llama_windows(gguf, prefixes, length, seed, kv_bytes, progress)
    with atomic_path(stored) as tmp, tmp.open("wb") as f:
        np.save(f, windows)
    return windows
