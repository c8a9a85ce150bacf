"""Long GGUF fuzz run: mutate the shipped GGUFs and run score / inspect / export --to gguf on each case.

    python scripts/fuzz_gguf.py --cases 10000 [--seed 0] [--smollm2-share 0.05] [--limit 10]

Every case is reproducible from (base, seed): see tests/gguf_fuzz.py. Prints the cases and command runs,
the outcomes by class and place (anything but ok / GatenormError is a bug), the slowest case (CPU time
of the process: wall time on a shared machine is mostly waiting; a run past 6x the limit in wall time is
interrupted and counted as a hang), and the seeds of the failing cases. Exit status 1 when any run
failed or went over --limit CPU seconds.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gguf_fuzz import COMMANDS, Layout, mutate, run_command  # noqa: E402


def bases(work: Path) -> dict[str, Layout]:
    """The mutated files: tiny, a gatenorm export of tiny (carries a plan for inspect), SmolLM2."""
    from exporters.export import export, open_model
    from gatenorm.methods import make_method_plan
    from gatenorm.models import smollm2, tiny

    ckpt = open_model(tiny())
    exported = export(ckpt, make_method_plan(ckpt, "gate-norm", 1), work / "tiny-export.gguf")
    return {"tiny": Layout.of(tiny()), "tiny-export": Layout.of(exported), "smollm2": Layout.of(smollm2())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0, help="first seed; case i uses seed + i")
    ap.add_argument("--smollm2-share", type=float, default=0.05, help="share of cases mutating SmolLM2")
    ap.add_argument("--limit", type=float, default=10.0, help="CPU seconds a command may take")
    ap.add_argument("--report-every", type=int, default=500)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="gatenorm-fuzz-") as tmp:
        work = Path(tmp)
        layouts = bases(work)
        out_dir = work / "out"
        out_dir.mkdir()
        case_file = work / "case.gguf"
        outcomes: collections.Counter[str] = collections.Counter()
        failures: list[tuple[str, int, str, str, str]] = []
        slowest = (0.0, "", 0, "", "")
        runs = 0
        start = time.perf_counter()
        for i in range(args.cases):
            seed = args.seed + i
            share = (seed * 0.6180339887) % 1.0  # a fixed, seed-determined spread of bases
            name = "smollm2" if share < args.smollm2_share else "tiny-export" if share < 0.4 else "tiny"
            data, what = mutate(layouts[name], seed)
            case_file.write_bytes(data)
            for command in COMMANDS:
                outcome, seconds = run_command(command, case_file, out_dir, args.limit)
                runs += 1
                key = outcome if outcome in ("ok", "GatenormError") else outcome.split(":")[0]
                outcomes[key] += 1
                if seconds > slowest[0]:
                    slowest = (seconds, name, seed, command, what)
                if key not in ("ok", "GatenormError") or seconds > args.limit:
                    failures.append((name, seed, command, what, outcome))
            if (i + 1) % args.report_every == 0:
                print(
                    f"{i + 1} cases, {runs} runs, {len(failures)} failures, "
                    f"{time.perf_counter() - start:.0f} s",
                    flush=True,
                )
    print(f"cases run: {args.cases} (seeds {args.seed}..{args.seed + args.cases - 1}), command runs: {runs}")
    print(f"wall time: {time.perf_counter() - start:.0f} s")
    print("outcomes by class and place:")
    for key, n in outcomes.most_common():
        print(f"  {n:7d}  {key}")
    s, name, seed, command, what = slowest
    print(f"slowest: {s:.2f} CPU s ({command} on {name} seed {seed}: {what})")
    for name, seed, command, what, outcome in failures[:50]:
        print(f"FAIL {name} seed {seed} {command} [{what}]: {outcome}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
