"""Run the variants of a batch: a local process pool (default) or Ray tasks on a cluster.

Each variant runs in a worker process, so a crash in a runtime (a segfault in llama.cpp) fails that
variant only: the pool is restarted and the variants not yet started go on. Workers die with the main
process (Linux: parent-death signal), so a killed run leaves no process writing into the output folder."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue as queue_mod
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from gatenorm.errors import GatenormError
from gatenorm.recipes.batch import Variant
from gatenorm.recipes.build import VariantResult, build_variant

#: (variant name, step, state) from a worker
OnEvent = Callable[[str, str, str], None]
OnResult = Callable[[VariantResult], None]

_events = None  # the worker's event queue, set by `_init_worker`


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _init_worker(events) -> None:
    global _events
    _events = events
    _die_with_parent()


def _emit(name: str, step: str, state: str) -> None:
    if _events is not None:
        _events.put((name, step, state))


def _build_in_worker(variant: Variant, out_dir: str) -> VariantResult:
    return build_variant(variant, out_dir, _emit)


def _drain(events, on_event: OnEvent, started: dict[str, str], timeout: float) -> None:
    """Hand every queued event to `on_event`, waiting up to `timeout` for the first."""
    try:
        item = events.get(timeout=timeout)
        while True:
            name, step, state = item
            started[name] = step
            on_event(name, step, state)
            item = events.get_nowait()
    except queue_mod.Empty:
        pass


def run_local(
    variants: Iterable[Variant], out: Path, jobs: int, on_event: OnEvent, on_result: OnResult
) -> list[VariantResult]:
    """Build `variants` in `jobs` worker processes; a worker that dies fails only the variants it was
    building (the others run in a fresh pool)."""
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    pending = list(variants)
    results: list[VariantResult] = []
    while pending:
        started: dict[str, str] = {}  # variant -> last step a worker reported
        with ProcessPoolExecutor(
            max_workers=max(1, min(jobs, len(pending))),
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(events,),
        ) as pool:
            futures = {pool.submit(_build_in_worker, v, str(out)): v for v in pending}
            pending = []
            broken: list[Variant] = []
            while futures:
                done, _ = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(events, on_event, started, 0.0 if done else 0.05)
                for future in done:
                    variant = futures.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        broken.append(variant)
                        continue
                    results.append(result)
                    on_result(result)
        _drain(events, on_event, started, 0.0)
        for variant in broken:  # the ones a dead worker had started fail; the rest run again
            if variant.name in started:
                step = started[variant.name]
                result = VariantResult(
                    variant.name,
                    steps={step: "failed"},
                    error=f"the worker process died during {step} (killed, or crashed in native code)",
                    failed_step=step,
                )
                results.append(result)
                on_event(variant.name, step, "failed")
                on_result(result)
            else:
                pending.append(variant)
    return results


def run_ray(
    variants: Iterable[Variant],
    out: Path,
    address: str | None,
    cpus_per_variant: int,
    on_event: OnEvent,
    on_result: OnResult,
) -> list[VariantResult]:
    """Build each variant as one Ray task on the cluster at `address` (None: a local Ray instance).

    Every node must see `out` at the same path (a shared file system) and have gatenorm installed."""
    try:
        import ray
        from ray.util.queue import Queue
    except ImportError:
        raise GatenormError("--executor ray needs Ray: pip install 'gatenorm[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, log_to_driver=False, include_dashboard=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise GatenormError(
                f"cannot connect to Ray at {address or 'a new local instance'}: {e}"
            ) from None
    try:
        events = Queue()

        def emit(name: str, step: str, state: str) -> None:
            events.put((name, step, state))

        task = ray.remote(num_cpus=cpus_per_variant, max_retries=0)(build_variant)
        refs = {task.remote(v, str(out.resolve()), emit): v for v in variants}
        results: list[VariantResult] = []
        started: dict[str, str] = {}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1, timeout=0.2)
            while not events.empty():
                name, step, state = events.get()
                started[name] = step
                on_event(name, step, state)
            for ref in done:
                variant = refs.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as e:  # the worker died: this variant fails, not the batch
                    step = started.get(variant.name, "export")
                    first = str(e).strip().splitlines()[0]
                    result = VariantResult(variant.name, {step: "failed"}, error=f"Ray task failed: {first}")
                    result.failed_step = step
                results.append(result)
                on_result(result)
        while not events.empty():
            on_event(*events.get())
        return results
    finally:
        if started_here:
            ray.shutdown()
