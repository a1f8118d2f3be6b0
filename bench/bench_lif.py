"""LIF neuron benchmark: spikeops vs eager PyTorch, SpikingJelly 2.0 and torch.compile.

Measured, side by side in one run, for each device (CPU; CUDA when available) and shape
(``small`` [4, 8, 64, 8, 8], ``main`` [4, 32, 384, 14, 14] = 38.5 MB fp32, ``large``
[4, 64, 384, 14, 14]), as the median of ``--repeats`` wall-clock times in ms:

* **fwd**: inference, ``torch.no_grad()``, input without grad;
* **fwd+bwd**: input requires grad, forward then ``torch.autograd.grad`` with a random grad;
* **saved MB**: bytes kept for backward by one forward (distinct storages, see harness);

for these implementations (same neuron: tau=2, v_th=1, hard reset to 0, decay_input,
detach_reset, sigmoid surrogate alpha=4):

* ``spikeops cpp`` (CPU) / ``spikeops triton`` (CUDA): the fused kernels;
* ``spikeops torch``: spikeops' plain-PyTorch reference loop (``backend="torch"``);
* ``eager``: the python loop below (SpikingJelly's equations, sigmoid-surrogate Heaviside);
* ``SpikingJelly``: ``neuron.LIFNode(step_mode="m")``, reset before each call;
* ``compile(eager)``, ``compile(SpikingJelly)``: ``torch.compile`` of the two above
  (compilation is set-up, not timed; a failure is recorded as the row's error);
* floors: ``x.clone()`` (allocates, as every op here does) and ``out.copy_(x)`` (preallocated).

Ratios in the same run: each row / ``x.clone()``; spikeops' speed-up over the others; on CPU the
issue's targets (pass/fail); and achieved bandwidth of spikeops, to compare with memory peak
(fwd: read x, write spikes, write H fp32; bwd: read grad, read H, write grad_x).
CPU timings use ``--malloc warm`` by default (freed memory is reused, no page faults; see
:func:`bench.harness.configure_malloc`). Results: markdown on stdout, JSON in
``bench/results/lif_<device>.json``.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import spikeops
from bench import harness as H
from bench.eager import SJ_ERROR, py_lif as eager_lif, sj_functional, sj_neuron, sj_surrogate

SHAPES = {
    "small": (4, 8, 64, 8, 8),
    "main": (4, 32, 384, 14, 14),
    "large": (4, 64, 384, 14, 14),
}
TAU, V_TH, ALPHA = 2.0, 1.0, 4.0
CLONE, COPY = "x.clone() [floor]", "out.copy_(x) [floor]"
SJ, SJ_C, EAGER, EAGER_C = "SpikingJelly", "compile(SpikingJelly)", "eager", "compile(eager)"


@dataclass
class Impl:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    slow: bool = False     # fewer repeats
    backward: bool = True  # has a fwd+bwd row


def sj_impls() -> list[Impl]:
    node = sj_neuron.LIFNode(tau=TAU, decay_input=True, v_threshold=V_TH, v_reset=0.0,
                             surrogate_function=sj_surrogate.Sigmoid(alpha=ALPHA),
                             detach_reset=True, step_mode="m")
    compiled = torch.compile(node, dynamic=False)

    def call(module):
        def fn(x):
            sj_functional.reset_net(node)
            return module(x)
        return fn

    return [Impl(SJ, call(node), slow=True), Impl(SJ_C, call(compiled))]


def make_impls(x: torch.Tensor) -> list[Impl]:
    out = torch.empty_like(x)
    impls = [Impl(CLONE, lambda t: t.clone(), backward=False),
             Impl(COPY, lambda t: out.copy_(t), backward=False)]
    kernel = "cpp" if x.device.type == "cpu" else "triton"
    if (kernel == "cpp" and spikeops.backend.cpp_available()) or (
            kernel == "triton" and spikeops.backend.TRITON_INSTALLED):
        impls.append(Impl(f"spikeops {kernel}", lambda t: spikeops.lif(t, backend=kernel)))
        impls.append(Impl(f"spikeops {kernel} bf16 state",
                          lambda t: spikeops.lif(t, backend=kernel, state_dtype=torch.bfloat16)))
    impls.append(Impl("spikeops torch", lambda t: spikeops.lif(t, backend="torch"), slow=True))
    impls.append(Impl(EAGER, eager_lif, slow=True))
    impls.append(Impl(EAGER_C, torch.compile(eager_lif, dynamic=False)))
    if SJ_ERROR is None:
        impls += sj_impls()
    return impls


def error_string(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300]


def bench_impl(impl: Impl, x: torch.Tensor, args) -> dict:
    """Median fwd / fwd+bwd ms and saved bytes of one implementation on input ``x``."""
    dev = x.device
    reps = min(args.repeats, max(3, args.repeats // 4)) if impl.slow else args.repeats
    xg = x.detach().clone().requires_grad_(True)
    g = torch.randn_like(x)

    def fwd():
        with torch.no_grad():
            return impl.fn(x)

    def fwd_bwd():
        return torch.autograd.grad(impl.fn(xg), xg, g)

    res = {"repeats": reps, "fwd_ms": None, "fwd_bwd_ms": None, "saved_mb": None,
           "saved_tensors": None, "setup_s": None, "error": None}
    try:
        t0 = time.perf_counter()
        fwd()
        if impl.backward:
            fwd_bwd()
        H.sync(dev)
        res["setup_s"] = round(time.perf_counter() - t0, 2)  # includes compilation
        res["fwd_ms"] = H.median(H.time_ms(fwd, reps, args.warmup, dev))
        if impl.backward:
            res["fwd_bwd_ms"] = H.median(H.time_ms(fwd_bwd, reps, args.warmup, dev))
            nbytes, count = H.saved_bytes(lambda: impl.fn(xg))
            res["saved_mb"], res["saved_tensors"] = nbytes / 1e6, count
    except Exception as exc:  # noqa: BLE001 - record and go on (e.g. torch.compile failure)
        res["error"] = error_string(exc)
    return res


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def derived(results: dict, x: torch.Tensor) -> dict:
    """Ratios to clone, spikeops speed-ups, CPU targets and achieved bandwidth."""
    clone = results[CLONE]["fwd_ms"]
    for r in results.values():
        r["fwd_vs_clone"] = ratio(r["fwd_ms"], clone)
        r["fwd_bwd_vs_clone"] = ratio(r["fwd_bwd_ms"], clone)
    sp_name = next((n for n in results if n in ("spikeops cpp", "spikeops triton")), None)
    out = {"spikeops": sp_name, "speedups": {}, "targets": [], "bandwidth_gb_s": {}}
    if sp_name is None or results[sp_name]["error"]:
        return out
    sp = results[sp_name]
    for other in (SJ, EAGER, SJ_C, EAGER_C, "spikeops torch"):
        if other in results:
            o = results[other]
            out["speedups"][other] = {"fwd": ratio(o["fwd_ms"], sp["fwd_ms"]),
                                      "fwd_bwd": ratio(o["fwd_bwd_ms"], sp["fwd_bwd_ms"])}

    if x.device.type == "cpu":
        sj, sjc = results.get(SJ, {}), results.get(SJ_C, {})
        checks = [
            ("spikeops fwd / clone", sp["fwd_vs_clone"], "<= 1.5", lambda v: v <= 1.5),
            ("SpikingJelly fwd / spikeops fwd", ratio(sj.get("fwd_ms"), sp["fwd_ms"]), ">= 5", lambda v: v >= 5),
            ("SpikingJelly fwd+bwd / spikeops fwd+bwd", ratio(sj.get("fwd_bwd_ms"), sp["fwd_bwd_ms"]), ">= 4",
             lambda v: v >= 4),
            ("spikeops fwd+bwd / compile(SJ) fwd+bwd", ratio(sp["fwd_bwd_ms"], sjc.get("fwd_bwd_ms")), "<= 1",
             lambda v: v <= 1),
            ("spikeops saved MB / compile(SJ) saved MB", ratio(sp["saved_mb"], sjc.get("saved_mb")), "< 1",
             lambda v: v < 1),
        ]
        bf16 = results.get(f"{sp_name} bf16 state", {})
        if bf16 and not bf16.get("error"):  # the documented low-memory option, reported beside the default
            checks += [
                ("bf16 state: fwd+bwd / compile(SJ) fwd+bwd", ratio(bf16["fwd_bwd_ms"], sjc.get("fwd_bwd_ms")),
                 "<= 1", lambda v: v <= 1),
                ("bf16 state: saved MB / compile(SJ) saved MB", ratio(bf16["saved_mb"], sjc.get("saved_mb")),
                 "< 1", lambda v: v < 1),
            ]
        out["targets"] = [{"check": c, "value": v, "target": t, "pass": None if v is None else ok(v)}
                          for c, v, t, ok in checks]

    n, es = x.numel(), x.element_size()
    fwd_bytes = n * (es + es)  # no_grad: read x, write spikes
    fwd_bwd_bytes = n * (es + es + 4) + n * (es + 4 + es)  # + write H; bwd: read grad, H, write grad_x
    bw = out["bandwidth_gb_s"]
    bw["clone"] = n * (es + es) / (clone * 1e6) if clone else None
    bw["spikeops fwd"] = fwd_bytes / (sp["fwd_ms"] * 1e6)
    bw["spikeops fwd+bwd"] = fwd_bwd_bytes / (sp["fwd_bwd_ms"] * 1e6) if sp["fwd_bwd_ms"] else None
    return out


def print_shape(dev: torch.device, name: str, entry: dict) -> None:
    res, d = entry["results"], entry["derived"]
    print(f"\n## LIF on {dev} | shape {name} {entry['shape']} {entry['dtype']} "
          f"({entry['input_mb']:.1f} MB) | {torch.get_num_threads()} threads | malloc {entry['malloc']}\n")
    rows = [[n, H.fmt(r["fwd_ms"]), H.fmt(r["fwd_vs_clone"]), H.fmt(r["fwd_bwd_ms"]),
             H.fmt(r["fwd_bwd_vs_clone"]), H.fmt(r["saved_mb"], 1), r["repeats"]] for n, r in res.items()]
    print(H.markdown_table(["implementation", "fwd ms", "fwd/clone", "fwd+bwd ms", "fwd+bwd/clone",
                            "saved MB", "repeats"], rows))
    notes = [f"* {n}: ERROR {r['error']}" if r["error"] else f"* {n}: compiled in {r['setup_s']:.1f} s (not timed)"
             for n, r in res.items() if r["error"] or n.startswith("compile(")]
    if notes:
        print("\n" + "\n".join(notes))
    if d["speedups"]:
        print(f"\n{d['spikeops']} speed-up (other ms / spikeops ms):\n")
        print(H.markdown_table(["vs", "fwd", "fwd+bwd"],
                               [[o, H.fmt(s["fwd"]), H.fmt(s["fwd_bwd"])] for o, s in d["speedups"].items()]))
    if d["targets"]:
        print("\nIssue targets (CPU):\n")
        print(H.markdown_table(["check", "value", "target", "pass"],
                               [[t["check"], H.fmt(t["value"]), t["target"], H.fmt(t["pass"])]
                                for t in d["targets"]]))
    if d["bandwidth_gb_s"]:
        bw = ", ".join(f"{k} {H.fmt(v, 1)}" for k, v in d["bandwidth_gb_s"].items())
        print(f"\nAchieved bandwidth, GB/s: {bw}")


def sj_version() -> Optional[str]:
    try:
        return importlib.metadata.version("spikingjelly")
    except importlib.metadata.PackageNotFoundError:
        return None


def run_device(dev: torch.device, shape_names: list[str], args) -> dict:
    dtype = getattr(torch, args.dtype)
    payload = H.run_header(dev)
    payload.update(benchmark="lif", dtype=args.dtype, repeats=args.repeats, warmup=args.warmup,
                   malloc=args.malloc_policy,
                   neuron=dict(tau=TAU, v_threshold=V_TH, v_reset=0.0, decay_input=True, detach_reset=True,
                               surrogate="sigmoid", alpha=ALPHA),
                   spikingjelly=sj_version(), spikingjelly_error=SJ_ERROR, shapes={})
    for name in shape_names:
        torch._dynamo.reset()  # each shape compiled on its own, with static shapes
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(SHAPES[name], generator=gen).to(dev, dtype)
        results = {impl.name: bench_impl(impl, x, args) for impl in make_impls(x)}
        entry = {"shape": list(SHAPES[name]), "dtype": args.dtype, "input_mb": x.numel() * x.element_size() / 1e6,
                 "malloc": args.malloc_policy if dev.type == "cpu" else "cuda caching allocator",
                 "results": results}
        entry["derived"] = derived(results, x)
        payload["shapes"][name] = entry
        print_shape(dev, name, entry)
        del x
    path = H.write_json(f"lif_{dev.type}", payload)
    print(f"\nwrote {path}")
    return payload


def run(args: argparse.Namespace) -> None:
    """Benchmark every selected shape on every selected device (flags: harness.add_common_args)."""
    shape_names = list(SHAPES) if args.shapes == "all" else [s.strip() for s in args.shapes.split(",")]
    unknown = [s for s in shape_names if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; choose from {list(SHAPES)} or 'all'")
    args.malloc_policy = H.configure_malloc(args.malloc)
    if SJ_ERROR:
        print(f"SpikingJelly not importable ({SJ_ERROR}): SpikingJelly rows skipped")
    for dev in H.devices(args.device):
        run_device(dev, shape_names, args)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.bench_lif", description=__doc__.splitlines()[0])
    run(H.add_common_args(parser).parse_args(argv))


if __name__ == "__main__":
    main()
