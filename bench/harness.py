"""Small shared harness for the spikeops benchmarks.

* :func:`time_ms` - wall time of one call in milliseconds, after warm-up, ``repeats`` times
  (``time.perf_counter`` on CPU; CUDA events after a synchronize on CUDA). Report the median.
  :func:`time_interleaved` times several functions round-robin (fairer side by side on a
  machine shared with other work).
* :func:`saved_bytes` - bytes that autograd keeps for backward after one forward call:
  a ``saved_tensors_hooks`` pack hook sums ``untyped_storage().nbytes()`` over the *distinct*
  storages (by data pointer) of the tensors saved, so several views of one buffer count once.
* :func:`configure_malloc` - makes CPU timings repeatable. A fresh 38.5 MB tensor from glibc is
  either new mmap'd pages (a page fault per 4 KiB: ``x.clone()`` ~6x slower than ``copy_``) or
  reused heap, depending on the allocation history, so row timings flip between the two.
  ``--malloc warm`` (default) keeps freed memory in the heap (like CUDA's caching allocator):
  timings are the kernels'; ``cold`` makes every tensor >= 128 KiB fresh pages; ``default``
  leaves glibc alone.
* :func:`machine_info`, :func:`markdown_table`, :func:`write_json` and the command-line flags
  shared by every ``bench_*`` module (:func:`add_common_args`).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags every bench module understands (``bench.run`` hands them to each)."""
    parser.add_argument("--shapes", default="all",
                        help="comma-separated shape names (e.g. 'main' or 'small,main'), or 'all'")
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed calls per fast implementation (slow ones get a quarter, >= 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                        help="'all' = CPU, plus CUDA when available")
    parser.add_argument("--malloc", choices=("warm", "cold", "default"), default="warm",
                        help="CPU allocator policy (see configure_malloc); warm = reuse freed memory")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    return parser


def devices(choice: str) -> list[torch.device]:
    """The devices to benchmark for ``--device``; asking for CUDA without one exits."""
    if choice == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False")
    out = [torch.device("cpu")] if choice in ("all", "cpu") else []
    if choice in ("all", "cuda") and torch.cuda.is_available():
        out.append(torch.device("cuda"))
    return out


def configure_malloc(mode: str) -> str:
    """Set glibc's malloc policy for this process (see the module docstring); returns what was set."""
    if mode == "default":
        return "default"
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return f"default (no glibc mallopt for --malloc {mode})"
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
    if mode == "warm":
        ok = mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    else:
        ok = mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    return mode if ok else f"default (mallopt failed for --malloc {mode})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Times of ``repeats`` calls of ``fn`` in ms, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: dict[str, int], warmup: int,
                     device: torch.device) -> dict[str, object]:
    """Like :func:`time_ms` for several functions, timed round-robin (one call of each per round,
    ``repeats[name]`` calls in all), so that a burst of load from other processes hits every row
    of a side-by-side table alike instead of one row. Returns name -> list of ms, or the
    exception that the function raised (the others go on)."""
    out: dict[str, object] = {}
    for name, fn in fns.items():
        try:
            time_ms(fn, 0, warmup, device)
            out[name] = []
        except Exception as exc:  # noqa: BLE001 - reported per row by the caller
            out[name] = exc
    for i in range(max(repeats.values(), default=0)):
        for name, fn in fns.items():
            if isinstance(out[name], list) and i < repeats[name]:
                try:
                    out[name].extend(time_ms(fn, 1, 0, device))
                except Exception as exc:  # noqa: BLE001
                    out[name] = exc
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, int]:
    """(bytes, number of distinct storages) saved for backward by one call of ``fn``.

    Storages of the tensors in ``exclude`` (e.g. ``module.parameters()``) are not counted, so
    two modules can be compared by the activations they keep.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t.detach()  # not t: see spikeops.memory (saving t would leak the graph)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values()), len(seen)


def other_cpu_busy(seconds: float = 0.5) -> Optional[float]:
    """Fraction of all CPU time used by other processes during ``seconds`` of our sleep (Linux)."""
    def sample():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(1.0 - (i1 - i0) / max(t1 - t0, 1), 3)


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "other_cpu_busy": other_cpu_busy(),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def run_header(device: torch.device) -> dict:
    """Date, command line and machine info for a results file; warns when other processes keep
    more than 20% of the CPUs busy (the timings will be noisy)."""
    header = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(getattr(sys, "orig_argv", sys.argv)),
        "device": str(device),
        "machine": machine_info(device),
    }
    busy = header["machine"]["other_cpu_busy"]
    if busy is not None and busy > 0.2:
        print(f"warning: other processes use {busy:.0%} of the CPUs; timings will be noisy")
    return header


def fmt(x: Optional[float], digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return f"{x:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def write_json(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
