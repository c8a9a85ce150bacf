"""Benchmark: Gate-Norm scoring time vs plain reading, matmul efficiency, and peak memory.

For SmolLM2 (the shipped Q4_1 GGUF) and two synthetic checkpoints this script writes (random weights, q/k
tensors only): a Llama-3-8B shape (32 layers, d=4096, 32 heads, 8 KV heads) as a GGUF F16 file, and a
Llama-2-7B shape (32 layers, d=4096, 32 heads, no GQA) as a sharded bf16 safetensors folder. It prints,
measured in one run (interleaved repetitions, medians):

- score time / time to just read the same q/k tensors (read + decode to float32, sequential);
- for the compute-bound case, the flops of the score divided by the time, as a fraction of what plain
  ``torch.matmul`` achieves on the same shapes (per layer on weights in memory, and end to end);
- peak RSS of a fresh process that scores, above that process's RSS after its imports, next to the
  size of two layers' q/k in float32.

Files are read from the page cache (just written), the fastest case for reading and so the hardest one for
the ratio. Usage: ``python scripts/bench_score.py [--workdir DIR] [--reps 3] [--keep]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gatenorm.methods import Method, score_checkpoint
from gatenorm.readers import open_checkpoint
from gatenorm.scoring import gate_norm, gate_norm_head, grouped_queries
from gatenorm.validate.bench import peak_rss_bytes

SHAPES = {
    "llama3-8b-shape": dict(n_layers=32, d=4096, n_head=32, n_kv=8, fmt="gguf"),
    "llama2-7b-shape": dict(n_layers=32, d=4096, n_head=32, n_kv=32, fmt="safetensors"),
}


def write_synthetic(name: str, folder: Path) -> Path:
    """Write random q/k weights of one shape, layer by layer, and return the checkpoint path."""
    import gguf
    from safetensors.torch import save_file

    s = SHAPES[name]
    d, dh = s["d"], s["d"] // s["n_head"]
    gen = torch.Generator().manual_seed(0)

    def layer(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.randn(s["n_head"] * dh, d, generator=gen) * 0.02
        k = torch.randn(s["n_kv"] * dh, d, generator=gen) * 0.02
        return q, k

    if s["fmt"] == "gguf":
        path = folder / f"{name}.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_block_count(s["n_layers"])
        writer.add_embedding_length(d)
        writer.add_head_count(s["n_head"])
        writer.add_head_count_kv(s["n_kv"])
        tensors = []
        for i in range(s["n_layers"]):
            q, k = layer(i)
            tensors += [(f"blk.{i}.attn_q.weight", q), (f"blk.{i}.attn_k.weight", k)]
        for tname, t in tensors:
            writer.add_tensor(tname, t.to(torch.float16).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path
    path = folder / name
    path.mkdir()
    config = dict(
        model_type="llama",
        num_hidden_layers=s["n_layers"],
        hidden_size=d,
        num_attention_heads=s["n_head"],
        num_key_value_heads=s["n_kv"],
    )
    (path / "config.json").write_text(json.dumps(config))
    weight_map = {}
    per_shard = 8
    for shard in range(s["n_layers"] // per_shard):
        fname = f"model-{shard + 1:05d}-of-{s['n_layers'] // per_shard:05d}.safetensors"
        tensors = {}
        for i in range(shard * per_shard, (shard + 1) * per_shard):
            q, k = layer(i)
            tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = q.to(torch.bfloat16)
            tensors[f"model.layers.{i}.self_attn.k_proj.weight"] = k.to(torch.bfloat16)
        save_file(tensors, str(path / fname))
        weight_map.update({t: fname for t in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def read_only(path: Path) -> float:
    """Seconds to read every layer's q/k and decode them to float32, with nothing else."""
    ckpt = open_checkpoint(path)
    start = time.perf_counter()
    for layer in range(ckpt.shape.n_layers):
        w = ckpt.read_attention(layer)
        del w
    return time.perf_counter() - start


def score_time(path: Path, method: Method) -> float:
    ckpt = open_checkpoint(path)
    start = time.perf_counter()
    score_checkpoint(ckpt, method)
    return time.perf_counter() - start


def score_flops(shape, method: Method) -> float:
    """Matmul flops the chosen route of `method` spends on one layer."""
    d, r = shape.d_model, shape.n_head_kv * shape.head_dim
    if method is Method.GATE_NORM_HEAD:
        return 2.0 * d * shape.head_dim**2 * (shape.n_head + shape.n_head_kv)
    return 2.0 * 2 * r * r * d if 2 * r < d else 2.0 * r * d * d


def kernel_efficiency(path: Path, method: Method, reps: int) -> tuple[float, float, float]:
    """(score GFLOP/s, torch.matmul GFLOP/s on the same shapes, ratio) on one layer held in memory."""
    ckpt = open_checkpoint(path)
    w = ckpt.read_attention(1)
    fn = gate_norm if method is Method.GATE_NORM else gate_norm_head
    p, k = grouped_queries(w), w.k
    r, d = k.shape

    def plain() -> None:  # the same products, as bare torch.matmul calls
        if method is Method.GATE_NORM_HEAD:
            q3 = w.q.view(w.n_head, w.head_dim, d)
            k3 = w.k.view(w.n_head_kv, w.head_dim, d)
            torch.matmul(q3, q3.transpose(1, 2))
            torch.matmul(k3, k3.transpose(1, 2))
        elif 2 * r < d:
            torch.matmul(p, p.T)
            torch.matmul(k, k.T)
        else:
            torch.matmul(p.T, k)

    def timed(f) -> float:
        f()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    flops = score_flops(ckpt.shape, method)
    t_ours, t_plain = timed(lambda: fn(w)), timed(plain)
    return flops / t_ours / 1e9, flops / t_plain / 1e9, t_plain / t_ours


def child_peak_rss(path: Path, method: Method) -> dict:
    """Peak RSS (VmHWM) of a fresh process scoring `path`, and its RSS after imports, in MiB.

    /proc's VmHWM belongs to the process's own address space; getrusage's maxrss would carry the
    parent's peak across fork and exec.
    """
    code = (
        "import json,re;from gatenorm.readers import open_checkpoint;"
        "from gatenorm.methods import score_checkpoint;import torch\n"
        "from gatenorm.validate.bench import peak_rss_bytes\n"
        "def mib(key):\n"
        "    return int(re.search(key+r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))/1024\n"
        "base=mib('VmRSS')\n"
        f"score_checkpoint(open_checkpoint({str(path)!r}),{method.value!r})\n"
        "print(json.dumps({'base':base,'peak':peak_rss_bytes()/2**20}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    ap.add_argument("--synthetic-only", action="store_true", help="skip SmolLM2 (where it is not installed)")
    args = ap.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-score-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; workdir {workdir}")
    models = {}
    if not args.synthetic_only:
        from gatenorm.models import smollm2

        models["smollm2-135m (Q4_1 gguf)"] = smollm2()
    for name in SHAPES:
        existing = [p for p in workdir.glob(f"{name}*") if p.suffix == ".gguf" or p.is_dir()]
        t = time.perf_counter()
        path = existing[0] if existing else write_synthetic(name, workdir)
        models[f"{name} ({SHAPES[name]['fmt']})"] = path
        print(f"prepared {name} in {time.perf_counter() - t:.1f} s")
    rows = []
    try:
        for label, path in models.items():
            ckpt = open_checkpoint(path)
            s = ckpt.shape
            qk_layer_f32 = (s.n_head + s.n_head_kv) * s.head_dim * s.d_model * 4 / 2**20
            for method in (Method.GATE_NORM, Method.GATE_NORM_HEAD):
                reads, scores = [], []
                for _ in range(args.reps):  # interleaved
                    reads.append(read_only(path))
                    scores.append(score_time(path, method))
                t_read, t_score = statistics.median(reads), statistics.median(scores)
                ours, plain, eff = kernel_efficiency(path, method, args.reps)
                e2e = score_flops(s, method) * s.n_layers / t_score / 1e9
                rss = child_peak_rss(path, method)
                gqa = s.n_head != s.n_head_kv
                bound = "io" if method is Method.GATE_NORM_HEAD or gqa else "compute"
                rows.append(
                    dict(
                        model=label,
                        method=method.value,
                        bound=bound,
                        read_s=t_read,
                        score_s=t_score,
                        ratio=t_score / t_read,
                        kernel_gflops=ours,
                        matmul_gflops=plain,
                        kernel_eff=eff,
                        e2e_eff=e2e / plain,
                        rss_base=rss["base"],
                        rss_peak=rss["peak"],
                        rss_extra=rss["peak"] - rss["base"],
                        two_layers_qk=2 * qk_layer_f32,
                    )
                )
                r = rows[-1]
                print(
                    f"{label:32s} {method.value:15s} [{bound:7s}] read {t_read:7.3f} s"
                    f"  score {t_score:7.3f} s"
                    f"  score/read {r['ratio']:5.2f}  kernel {ours:6.1f} vs matmul {plain:6.1f} GFLOP/s"
                    f" ({eff:4.2f}x, end-to-end {r['e2e_eff']:4.2f}x)  peak RSS {rss['peak']:7.0f} MiB"
                    f" = {rss['base']:5.0f} after imports + {r['rss_extra']:6.0f}"
                    f" (2 layers q/k f32 = {2 * qk_layer_f32:5.0f} MiB)",
                    flush=True,
                )
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\ntargets: score/read <= 1.3 where io-bound; matmul efficiency >= 0.7 where compute-bound;")
    print("         peak RSS above imports <= 2 layers of q/k + 200 MiB")
    for r in rows:
        ok_ratio = r["ratio"] <= 1.3 if r["bound"] == "io" else r["e2e_eff"] >= 0.7
        ok_rss = r["rss_extra"] <= r["two_layers_qk"] + 200
        print(
            f"  {r['model']:32s} {r['method']:15s} speed {'OK ' if ok_ratio else 'MISS'}"
            f"  memory {'OK ' if ok_rss else 'MISS'}"
        )
    driver = peak_rss_bytes() / 2**20
    print(f"max RSS of this driver process: {driver:.0f} MiB")


if __name__ == "__main__":
    main()
