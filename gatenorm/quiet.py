"""Keep third-party progress chatter (stdout prints, INFO logs, warnings, progress bars) off the console."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet(*logger_names: str) -> Iterator[None]:
    """Silence stdout, warnings and every logger named (and the root logger) below ERROR."""
    loggers = [logging.getLogger(name) for name in ("", *logger_names)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """`quiet`, with transformers' progress bars off: its own (tokenizer conversion) by its switch, and the
    GGUF loader's plain tqdm bar, which no switch reaches, by keeping stderr prints off the console
    (exceptions still propagate)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with quiet("transformers"), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
