"""Where a training step's time goes: ``python -m bench.profile_train_step [--case v2_512] [--device cuda]``.

For each build of :mod:`bench.bench_train_step` (spikeops, torch, spikingjelly) it times ``--steps``
steps, then records two more under ``torch.profiler`` and prints: wall time per step, device
(kernel) time per step and their ratio (a step whose kernels keep the GPU busy has busy ~ 1; a
step waiting on the host has less), host-device synchronisations per step, and the kernels (or on
CPU the operators) with the most self time. A diagnosis tool: the claims live in bench_train_step.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench import bench_train_step as ts
from bench import harness as H

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def device_time_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def profile_build(name, step, dev, steps: int, top: int) -> dict:
    times = H.time_ms(step, steps, 2, dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    n = 2
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        H.sync(dev)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    syncs = dtoh = 0
    for e in prof.events():
        if dev.type == "cuda" and e.device_type == DeviceType.CUDA:
            kernels[e.name][0] += e.device_time / 1e3
            kernels[e.name][1] += 1
        elif dev.type == "cpu" and e.device_type == DeviceType.CPU and e.name.startswith("aten::"):
            kernels[e.name][0] += e.self_cpu_time_total / 1e3
            kernels[e.name][1] += 1
        if e.name in SYNC_CALLS:
            syncs += 1
        if e.name.startswith("cudaMemcpy") and "DtoH" in str(getattr(e, "input_shapes", "")):
            dtoh += 1
    busy = sum(v[0] for v in kernels.values()) / n
    wall = H.median(times)
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    print(f"\n### {name}: step {wall:.1f} ms (median of {len(times)}), "
          f"{'kernel' if dev.type == 'cuda' else 'aten self'} time {busy:.1f} ms/step "
          f"({busy / wall:.2f} of the step), host syncs {syncs / n:.0f}/step\n")
    rows = [[k[:90], H.fmt(v[0] / n, 2), str(v[1] // n), H.fmt(100 * v[0] / n / busy, 1) if busy else "-"]
            for k, v in ranked]
    print(H.markdown_table(["kernel" if dev.type == "cuda" else "op", "ms/step", "calls/step", "% of busy"], rows))
    return {"step_ms": wall, "busy_ms": busy, "syncs_per_step": syncs / n,
            "top": [{"name": k, "ms_per_step": v[0] / n, "calls_per_step": v[1] / n} for k, v in ranked]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="v2_512", choices=sorted(ts.CASES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per build before profiling")
    parser.add_argument("--top", type=int, default=15, help="kernels listed per build")
    parser.add_argument("--builds", default=",".join(ts.BUILDS), help="comma-separated subset of " + ",".join(ts.BUILDS))
    parser.add_argument("--amp", default="off", choices=sorted(ts.AMP_DTYPES), help="autocast dtype, as bench_train_step")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        H.configure_malloc("warm")  # as bench_train_step: freed memory reused, no page-fault noise
    case = ts.CASES[args.case]
    if dev.type not in case["batch"]:
        parser.error(f"case {args.case} has no batch size for {dev.type}")
    models = ts.builds(case, dev)
    batch = case["batch"][dev.type]
    x, y = ts.random_batch(case, batch, models["spikeops"], dev)
    print(f"## {case['model']} b{batch} T{models['spikeops'].T} {case['img']}px amp {args.amp} on {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""))
    results = {}
    for name in args.builds.split(","):
        if name in models:
            model = models[name]
            step = ts.train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4), x, y, args.amp)
            results[name] = profile_build(name, step, dev, args.steps, args.top)
    H.write_json(f"profile_train_step_{args.case}_{dev.type}" + ("" if args.amp == "off" else f"_{args.amp}"), {**H.run_header(dev), "results": results})


if __name__ == "__main__":
    main()
