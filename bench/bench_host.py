"""Host time per call: what a layer costs when its kernels take next to nothing.

At the tiny shape below (T=2, B=1, N=16 tokens, D=32 channels, 2 heads) every kernel finishes in
microseconds, so a call's wall time is its Python and dispatch work: the time a GPU step spends
launch-bound, and a floor for small-batch inference anywhere. Each spikeops layer is timed round-robin
with its eager counterpart (nn layers + SpikingJelly 2.0 ``LIFNode``, reset before each call; the
python LIF without SpikingJelly) in one run, as the median of ``--repeats`` calls in microseconds;
on the CPU with 1 thread (the host work a CUDA run does too, minus the launches):

* **fwd** (``torch.no_grad()``) and **fwd+bwd** (input requires grad, ``out.sum().backward()``);
* on CUDA (``--device cuda``/``all`` with a GPU) the same pairs on the GPU: there each call is
  launch-bound (host work, Triton/CUDA launches and host syncs), timed with CUDA events;
* ``nn.LIF`` vs ``LIFNode``; ``SpikingSelfAttention`` + ``SpikingMLP`` (a Spikformer block) vs
  ``bench_ssa.EagerBlock``; ``MultiScaleSpikingAttention`` / ``QKTokenAttention`` vs
  ``bench_token_attention.EagerTokenAttention``. Same weights in each pair.

Results: markdown on stdout, JSON in ``bench/results/host_<device>.json``.
"""
from __future__ import annotations

import argparse
from typing import Callable, Optional

import torch
from torch import nn

import spikeops
from bench import harness as H
from bench.bench_ssa import Block, EagerBlock, copy_weights as copy_block_weights
from bench.bench_token_attention import EagerTokenAttention, copy_weights as copy_attention_weights
from bench.eager import SJ_ERROR, reset, sjlif
from spikeops.ops.known_counts import mark_counts

T, B, N, D, HEADS = 2, 1, 16, 32, 2
DENSITY = 0.3


def pairs(dev: torch.device) -> dict[str, tuple[nn.Module, nn.Module, tuple[int, ...]]]:
    """name -> (spikeops module, eager module with the same weights, input shape), on ``dev``."""
    out = {"LIF": (spikeops.nn.LIF(), sjlif(1.0), (T, B, N, D))}
    block, eager_block = Block(D, HEADS), EagerBlock(D, HEADS)
    copy_block_weights(block, eager_block)
    out["Spikformer block (SSA + MLP)"] = (block, eager_block, (T, B, N, D))
    for name, module, p_kernel in (("MultiScaleSpikingAttention", spikeops.nn.MultiScaleSpikingAttention, 3),
                                   ("QKTokenAttention", spikeops.nn.QKTokenAttention, None)):
        sp = module(D, HEADS)
        ea = EagerTokenAttention(D, HEADS, p_kernel)
        copy_attention_weights(sp, ea)
        out[name] = (sp, ea, (T, B, D, N))
    return {name: (sp.to(dev), ea.to(dev), shape) for name, (sp, ea, shape) in out.items()}


def calls(module: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    xg = mark_counts(x.detach().clone().requires_grad_(True))  # as x: spikes a spikeops layer made

    def fwd():
        reset(module)
        with torch.no_grad():
            return module(x)

    def fwd_bwd():
        reset(module)
        module(xg).sum().backward()

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def measure(sp: nn.Module, ea: nn.Module, shape, args, dev: torch.device) -> dict:
    # spikes as a spikeops layer hands them on inside a model (known: no value check, see known_counts)
    x = mark_counts((torch.rand(shape, generator=torch.Generator().manual_seed(0)) < DENSITY).float().to(dev))
    entry: dict = {"shape": list(shape)}
    for kind in ("fwd", "fwd+bwd"):
        fns = {"spikeops": calls(sp, x)[kind], "eager": calls(ea, x)[kind]}
        times = H.time_interleaved(fns, {n: args.repeats for n in fns}, args.warmup, dev)
        entry[kind] = {n: (H.median(t) * 1e3 if isinstance(t, list) else None) for n, t in times.items()}
        entry[kind]["errors"] = {n: repr(t) for n, t in times.items() if not isinstance(t, list)}
        sp_us, ea_us = entry[kind]["spikeops"], entry[kind]["eager"]
        entry[kind]["eager_over_spikeops"] = ea_us / sp_us if sp_us and ea_us else None
    return entry


def run_device(dev: torch.device, args) -> None:
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)
    try:
        results = {name: measure(*pair, args, dev) for name, pair in pairs(dev).items()}
    finally:
        torch.set_num_threads(threads)
    eager_name = "nn + SpikingJelly LIFNode" if SJ_ERROR is None else "nn + python LIF (no SpikingJelly)"
    where = "1 thread" if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    print(f"\n## Host time per call on {dev} | T={T} B={B} N={N} D={D} heads={HEADS} | {where} | us, medians\n")
    rows = []
    for name, e in results.items():
        rows.append([name, H.fmt(e["fwd"]["spikeops"], 0), H.fmt(e["fwd"]["eager"], 0),
                     H.fmt(e["fwd"]["eager_over_spikeops"]), H.fmt(e["fwd+bwd"]["spikeops"], 0),
                     H.fmt(e["fwd+bwd"]["eager"], 0), H.fmt(e["fwd+bwd"]["eager_over_spikeops"])])
    print(H.markdown_table(["layer", "spikeops fwd", "eager fwd", "eager/spikeops", "spikeops fwd+bwd",
                            "eager fwd+bwd", "eager/spikeops"], rows))
    print(f"\neager = {eager_name}")
    for name, e in results.items():
        for kind in ("fwd", "fwd+bwd"):
            for impl, err in e[kind]["errors"].items():
                print(f"* {name} {kind} {impl}: ERROR {err}")
    payload = {**H.run_header(dev), "eager": eager_name, "repeats": args.repeats, "results": results}
    print(f"\nwrote {H.write_json(f'host_{dev.type}', payload)}")


def run(args: argparse.Namespace) -> None:
    H.configure_malloc(args.malloc)
    for dev in H.devices(args.device):
        run_device(dev, args)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.bench_host", description=__doc__.splitlines()[0])
    H.add_common_args(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
