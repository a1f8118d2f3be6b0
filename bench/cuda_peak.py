"""Where the CUDA memory peak of one training step is: the tensors alive at that moment, grouped
by the line of Python that allocated them.

    python -m bench.cuda_peak --case v2_512 [--builds spikeops,torch] [--amp off|bf16|fp16] [--top 20]

For each build of :mod:`bench.bench_train_step` (same model, batch and optimizer step): two warm-up
steps, then one step recorded by the caching allocator's history
(``torch.cuda.memory._record_memory_history``, Python frames only). The trace is replayed to find
the moment the allocated bytes peak; what was allocated before the step (parameters, gradients,
optimizer state) is one row, every block allocated during the step and still alive at the peak is
attributed to the innermost frame in this repository (spikeops/, models/, bench/) or, when the
allocation came from the C++ autograd engine with no such frame, to its innermost frame at all.
Prints a markdown table per build (CUDA only).
"""
from __future__ import annotations

import argparse
import collections
import os

import torch

from bench import bench_train_step as ts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def frame_label(frames: list) -> str:
    """The innermost frame from this repository (else the innermost of all) as ``file:line func``."""
    ours = [f for f in frames if f.get("filename", "").startswith(REPO)]
    pick = (ours or frames or [{}])[0]
    name = os.path.relpath(pick["filename"], REPO) if ours else os.path.basename(pick.get("filename", "?"))
    return f"{name}:{pick.get('line', '?')} {pick.get('name', '')}" if pick else "(no frame)"


def live_at_peak(events: list, baseline: int):
    """Replay allocator events; returns (peak bytes, {label: bytes} of the step's blocks alive at
    the peak, bytes still alive from before the step). ``baseline``: bytes allocated when recording
    started (blocks whose alloc is not in the trace)."""
    live, before, total = {}, baseline, baseline
    peak, peak_live, peak_before = total, {}, before
    for ev in events:
        action, addr, size = ev.get("action"), ev.get("addr"), ev.get("size", 0)
        if action == "alloc":
            live[addr] = (size, frame_label(ev.get("frames", [])))
            total += size
        elif action == "free_completed":
            if addr in live:
                total -= live.pop(addr)[0]
            else:  # a block allocated before recording started
                before -= size
                total -= size
        else:
            continue
        if total > peak:
            peak, peak_live, peak_before = total, dict(live), before
    groups = collections.Counter()
    for size, label in peak_live.values():
        groups[label] += size
    return peak, groups, peak_before


def profile_build(name: str, model, x, y, amp: str, top: int) -> str:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = ts.train_step(model, opt, x, y, amp)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = snapshot["device_traces"][torch.cuda.current_device()]
    peak, groups, before = live_at_peak(events, baseline)
    mb = 1e6
    lines = [f"### {name}: peak {peak / mb:.0f} MB by the trace (max_memory_allocated "
             f"{torch.cuda.max_memory_allocated() / mb:.0f} MB); from before the step {before / mb:.0f} MB; "
             f"{len(events)} allocator events",
             "", "| allocated at | MB alive at the peak |", "|---|---|"]
    lines += [f"| {label} | {size / mb:.0f} |" for label, size in groups.most_common(top)]
    rest = sum(size for _, size in groups.most_common()[top:])
    lines.append(f"| (other lines) | {rest / mb:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="v2_512", choices=sorted(ts.CASES))
    parser.add_argument("--builds", default="spikeops,torch")
    parser.add_argument("--amp", default="off", choices=tuple(ts.AMP_DTYPES))
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.cuda_peak needs a CUDA device (it reads the CUDA caching allocator's history)")
    dev = torch.device("cuda")
    case = ts.CASES[args.case]
    models = ts.builds(case, dev)
    x, y = ts.random_batch(case, case["batch"]["cuda"], models["spikeops"], dev)
    print(f"## {args.case}: {case['model']} b{case['batch']['cuda']} {case['img']}px amp {args.amp} on "
          f"{torch.cuda.get_device_name()}")
    for name in args.builds.split(","):
        print(profile_build(name, models[name], x, y, args.amp, args.top))
        print()


if __name__ == "__main__":
    main()
