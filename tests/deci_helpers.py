"""A test-only rewriter of deci GGUFs into Nemotron-NAS style files (no gatenorm keys, per-layer FFN
widths), with gguf-py's reader and writer: independent of gatenorm's own GGUF writer."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

V = gguf.GGUFValueType


def nemotron_style(src: Path, out: Path, ffn_widths: dict[int, int] | None = None) -> Path:
    """`src` without its ``gatenorm.*`` keys, layer i's FFN cut to its first `ffn_widths[i]` units."""
    return rewritten(src, out, ("gatenorm.",), ffn_widths)


def rewritten(
    src: Path, out: Path, drop: tuple[str, ...] = (), ffn_widths: dict[int, int] | None = None
) -> Path:
    """An F32 GGUF `src` copied without the keys starting with `drop`, layer i's FFN cut as above."""
    ffn_widths = ffn_widths or {}
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    widths = reader.fields[f"{arch}.feed_forward_length"].contents()
    if ffn_widths:
        widths = list(widths)
        for i, w in ffn_widths.items():
            widths[i] = w
    for name, field in reader.fields.items():
        if name.startswith(("GGUF.", *drop)) or name == "general.architecture":
            continue
        value = widths if name == f"{arch}.feed_forward_length" else field.contents()
        sub = field.types[-1] if field.types[0] == V.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub)
    for t in reader.tensors:
        data = np.asarray(t.data)
        parts = t.name.split(".")
        if parts[0] == "blk" and int(parts[1]) in ffn_widths:
            w = ffn_widths[int(parts[1])]
            if parts[2] in ("ffn_gate", "ffn_up"):
                data = data[:w]
            elif parts[2] == "ffn_down":
                data = data[:, :w]
        writer.add_tensor(t.name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
