"""Masked (sparse) convolution benchmark: spikeops vs dense conv2d + mask and SparK-style masking.

The shapes are the Spiking Convolutional Stem (SCS) of Spikformer V2-8-384 on 224x224 input in
MAE-style pre-training: batch 8, T=1, a random 14x14 patch mask (True = visible) with mask ratio
0.75 and 0.5, upsampled x8 / x4 / x2 / x1 for the four blocks. Block i (C_i = 48, 96, 192, 384):
conv2x2/s2 C_{i-1} -> C_i, conv3x3/p1 C_i -> 4 C_i, conv3x3/p1 4 C_i -> C_i, no bias.

Measured, side by side in one run (rows of a table timed round-robin,
:func:`bench.harness.time_interleaved`), median of ``max(3, --repeats // 4)`` wall-clock times in ms:

* **layers** (each of the 12 convs on its own; the last row sums them):
  ``dense``: ``F.conv2d(x, w, stride, padding) * mask_up`` (mask upsampled once, float);
  ``SparK``: SparK's ``SparseConv2d``: ``y = F.conv2d(...); y *= mask.repeat_interleave(..)``
  (the bool mask upsampled on every call, in-place multiply);
  ``spikeops cpp`` (CPU) / ``spikeops triton`` (CUDA): ``spikeops.masked_conv2d`` (visible
  blocks only).
* **stem** (the 12 convs chained, each followed by its BatchNorm; no neuron, which costs the same
  for all rows): ``dense``: conv * mask, dense ``F.batch_norm`` * mask (the cost floor of "dense
  then mask"; its BN statistics include masked positions, so it is not the same function);
  ``SparK``: conv *= mask, SparK's ``SparseBatchNorm2d`` (boolean-index gather -> BatchNorm1d ->
  scatter); ``spikeops``: ``masked_conv2d`` -> ``masked_batch_norm2d``.

For each: **fwd** (``torch.no_grad()``) and **fwd+bwd** (input and weights require grad; forward
then ``torch.autograd.grad`` with a random output grad), plus MB saved for backward (distinct
storages, parameters excluded). On CPU the issue's target is checked: at mask ratio 0.75,
spikeops >= 2.5x faster than dense (sum over the layers, fwd and fwd+bwd; and the stem vs both).

``--shapes``: ``layers``, ``stem`` or ``all`` (``main`` = all, ``small``/``large`` = nothing, the
names other bench modules use). ``python -m bench.bench_masked_conv --threads N`` sets torch's
thread count. CPU timings use ``--malloc warm`` (see :func:`bench.harness.configure_malloc`).
Results: markdown on stdout, JSON in ``bench/results/masked_conv_<device>.json``.
"""
from __future__ import annotations

import argparse
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import spikeops
from bench import harness as H

BATCH, IMAGE, PATCH_GRID = 8, 224, 14
WIDTHS = (3, 48, 96, 192, 384)  # V2-8-384: D/8, D/4, D/2, D
EXPAND = 4
RATIOS = (0.75, 0.5)
SECTIONS = ("layers", "stem")
ALIASES = {"main": SECTIONS, "small": (), "large": ()}
DENSE, SPARK = "dense conv2d * mask", "SparK (dense, y *= mask)"
TARGET = 2.5


def scs_layers() -> list[dict]:
    """The 12 convs of the V2-8-384 SCS: name, C_in, C_out, kernel, stride, padding, input size."""
    layers, size = [], IMAGE
    for i, (cin, c) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:]), 1):
        layers.append(dict(name=f"b{i}.down 2x2/s2 {cin}->{c} @{size}", cin=cin, cout=c, k=2, s=2, p=0, size=size))
        size //= 2
        layers.append(dict(name=f"b{i}.expand 3x3 {c}->{EXPAND * c} @{size}", cin=c, cout=EXPAND * c, k=3, s=1, p=1,
                           size=size))
        layers.append(dict(name=f"b{i}.contract 3x3 {EXPAND * c}->{c} @{size}", cin=EXPAND * c, cout=c, k=3, s=1, p=1,
                           size=size))
    return layers


def make_mask(ratio: float, device) -> torch.Tensor:
    """[B, 1, 14, 14] bool, exactly round(ratio * 196) masked patches per image (True = visible)."""
    g = torch.Generator().manual_seed(0)
    n_masked = round(ratio * PATCH_GRID * PATCH_GRID)
    keep = torch.rand(BATCH, PATCH_GRID * PATCH_GRID, generator=g).argsort(1) >= n_masked
    return keep.view(BATCH, 1, PATCH_GRID, PATCH_GRID).to(device)


def spark_active(mask: torch.Tensor, size: int) -> torch.Tensor:
    """SparK's ``_get_active_ex_or_ii``: the bool mask upsampled by repeat_interleave."""
    r = size // mask.shape[-1]
    return mask.repeat_interleave(r, dim=2).repeat_interleave(r, dim=3)


def spark_conv(x, w, mask, s, p):
    y = F.conv2d(x, w, None, s, p)
    y *= spark_active(mask, y.shape[-1])
    return y


def spark_bn(x, mask, bn_args):
    """SparK's ``SparseBatchNorm2d.forward``: gather visible [P, C] -> BatchNorm1d -> scatter."""
    ii = spark_active(mask, x.shape[-1])[:, 0].nonzero(as_tuple=True)
    bhwc = x.permute(0, 2, 3, 1)
    nc = F.batch_norm(bhwc[ii], *bn_args)
    out = torch.zeros_like(bhwc)
    out[ii] = nc
    return out.permute(0, 3, 1, 2)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def error_string(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300]


def measure(impls: dict[str, Callable], inputs: list[torch.Tensor], out_grad_shape, reps: int, args,
            dev: torch.device) -> dict:
    """fwd / fwd+bwd median ms and saved MB of each ``impl(*inputs)``, timed round-robin."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    g = torch.randn(out_grad_shape, device=dev)

    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn(*inputs)
        return run

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(*leaves), leaves, g)

    res = {}
    for mode, wrap in (("fwd_ms", fwd), ("fwd_bwd_ms", fwd_bwd)):
        times = H.time_interleaved({n: wrap(fn) for n, fn in impls.items()}, {n: reps for n in impls}, args.warmup,
                                   dev)
        for n, t in times.items():
            r = res.setdefault(n, {"fwd_ms": None, "fwd_bwd_ms": None, "saved_mb": None, "error": None})
            if isinstance(t, Exception):
                r["error"] = error_string(t)
            else:
                r[mode] = H.median(t)
    for n, fn in impls.items():
        if res[n]["error"] is None:
            res[n]["saved_mb"] = H.saved_bytes(lambda: fn(*leaves), exclude=leaves[1:])[0] / 1e6
    return res


def kernel_name(dev: torch.device) -> str:
    return "spikeops cpp" if dev.type == "cpu" else "spikeops triton"


def bench_layers(dev, dtype, ratio_: float, args) -> dict:
    mask = make_mask(ratio_, dev)
    reps = max(3, args.repeats // 4)
    out, totals = {}, {}
    for layer in scs_layers():
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(BATCH, layer["cin"], layer["size"], layer["size"], generator=gen).to(dev, dtype)
        w = (torch.randn(layer["cout"], layer["cin"], layer["k"], layer["k"], generator=gen) * 0.05).to(dev, dtype)
        s, p = layer["s"], layer["p"]
        osize = (layer["size"] + 2 * p - layer["k"]) // s + 1
        m_up = spikeops.reference.upsample_mask(mask, BATCH, (osize, osize)).to(dtype)
        impls = {
            DENSE: lambda x_, w_: F.conv2d(x_, w_, None, s, p) * m_up,
            SPARK: lambda x_, w_: spark_conv(x_, w_, mask, s, p),
            kernel_name(dev): lambda x_, w_: spikeops.masked_conv2d(x_, w_, mask, None, s, p),
        }
        res = measure(impls, [x, w], (BATCH, layer["cout"], osize, osize), reps, args, dev)
        out[layer["name"]] = res
        for n, r in res.items():
            t = totals.setdefault(n, {"fwd_ms": 0.0, "fwd_bwd_ms": 0.0, "saved_mb": 0.0, "error": None})
            for key in ("fwd_ms", "fwd_bwd_ms", "saved_mb"):
                t[key] = None if t[key] is None or r[key] is None else t[key] + r[key]
        print(f"  {layer['name']}: " + ", ".join(f"{n} {H.fmt(r['fwd_ms'], 1)}/{H.fmt(r['fwd_bwd_ms'], 1)} ms"
                                                 for n, r in res.items()), flush=True)
    out["total (12 convs)"] = totals
    return out


def bench_stem(dev, dtype, ratio_: float, args) -> dict:
    mask = make_mask(ratio_, dev)
    layers = scs_layers()
    gen = torch.Generator().manual_seed(2)
    ws = [(torch.randn(l["cout"], l["cin"], l["k"], l["k"], generator=gen) * (2.0 / (l["cin"] * l["k"] ** 2)) ** 0.5)
          .to(dev, dtype) for l in layers]
    gammas = [torch.ones(l["cout"], device=dev) for l in layers]
    betas = [torch.zeros(l["cout"], device=dev) for l in layers]
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen).to(dev, dtype)
    m_ups = {}
    for l in layers:
        osize = (l["size"] + 2 * l["p"] - l["k"]) // l["s"] + 1
        m_ups[osize] = spikeops.reference.upsample_mask(mask, BATCH, (osize, osize)).to(dtype)

    def stem(conv, bn):
        def run(x_, *params):
            n = len(layers)
            h = x_
            for i, l in enumerate(layers):
                h = conv(h, params[i], l["s"], l["p"])
                h = bn(h, params[n + i], params[2 * n + i])
            return h
        return run

    def dense_conv(h, w, s, p):
        y = F.conv2d(h, w, None, s, p)
        return y * m_ups[y.shape[-1]]

    def dense_bn(h, g, b):
        return F.batch_norm(h, None, None, g, b, True, 0.1, 1e-5) * m_ups[h.shape[-1]]

    impls = {
        DENSE + " (dense BN stats)": stem(dense_conv, dense_bn),
        SPARK + " + SparK BN": stem(lambda h, w, s, p: spark_conv(h, w, mask, s, p),
                                    lambda h, g, b: spark_bn(h, mask, (None, None, g, b, True, 0.1, 1e-5))),
        kernel_name(dev): stem(lambda h, w, s, p: spikeops.masked_conv2d(h, w, mask, None, s, p),
                               lambda h, g, b: spikeops.masked_batch_norm2d(h, mask, None, None, g, b, True)),
    }
    reps = max(3, args.repeats // 4)
    return {"stem (12 conv+BN)": measure(impls, [x] + ws + gammas + betas, (BATCH, WIDTHS[-1], 14, 14), reps, args,
                                         dev)}


def print_table(title: str, rows: dict, kernel: str) -> None:
    print(f"\n### {title}\n")
    table = []
    for name, res in rows.items():
        sp = res.get(kernel, {})
        for impl, r in res.items():
            speed = "" if impl == kernel else (f"{H.fmt(ratio(r['fwd_ms'], sp.get('fwd_ms')))} / "
                                                f"{H.fmt(ratio(r['fwd_bwd_ms'], sp.get('fwd_bwd_ms')))}")
            table.append([name, impl, H.fmt(r["fwd_ms"], 1), H.fmt(r["fwd_bwd_ms"], 1), H.fmt(r["saved_mb"], 1),
                          speed if not r["error"] else "ERROR " + r["error"]])
    print(H.markdown_table(["shape", "implementation", "fwd ms", "fwd+bwd ms", "saved MB",
                            "this / spikeops (fwd / fwd+bwd)"], table))


def targets(payload: dict, kernel: str) -> list[dict]:
    out = []
    for section, key in (("layers", "total (12 convs)"), ("stem", "stem (12 conv+BN)")):
        res = payload["ratios"].get("0.75", {}).get(section, {}).get(key)
        if not res or kernel not in res:
            continue
        sp = res[kernel]
        for impl, r in res.items():
            if impl == kernel:
                continue
            for mode in ("fwd_ms", "fwd_bwd_ms"):
                v = ratio(r[mode], sp[mode])
                out.append({"check": f"{key}: {impl} / spikeops, {mode[:-3].replace('_', '+')}", "value": v,
                            "target": f">= {TARGET}", "pass": None if v is None else v >= TARGET})
    return out


def run_device(dev: torch.device, sections: list[str], args) -> dict:
    dtype = getattr(torch, args.dtype)
    payload = H.run_header(dev)
    payload.update(benchmark="masked_conv", dtype=args.dtype, repeats=max(3, args.repeats // 4), warmup=args.warmup,
                   malloc=args.malloc_policy if dev.type == "cpu" else "cuda caching allocator",
                   batch=BATCH, T=1, image=IMAGE, widths=list(WIDTHS[1:]), expand=EXPAND, ratios={})
    kernel = kernel_name(dev)
    for r in RATIOS:
        entry = payload["ratios"].setdefault(str(r), {})
        for section in sections:
            print(f"\n## masked conv on {dev} | {section} | mask ratio {r} | batch {BATCH}, T=1, {IMAGE}x{IMAGE} | "
                  f"{torch.get_num_threads()} threads | {args.dtype}", flush=True)
            entry[section] = (bench_layers if section == "layers" else bench_stem)(dev, dtype, r, args)
            print_table(f"{section}, mask ratio {r} ({dev}, ms)", entry[section], kernel)
    payload["targets"] = targets(payload, kernel) if dev.type == "cpu" else []
    if payload["targets"]:
        print("\nIssue target (CPU, mask ratio 0.75): spikeops >= 2.5x faster\n")
        print(H.markdown_table(["check", "value", "target", "pass"],
                               [[t["check"], H.fmt(t["value"]), t["target"], H.fmt(t["pass"])]
                                for t in payload["targets"]]))
    path = H.write_json(f"masked_conv_{dev.type}", payload)
    print(f"\nwrote {path}")
    return payload


def run(args: argparse.Namespace) -> None:
    """Benchmark the selected sections on every selected device (flags: harness.add_common_args)."""
    if args.shapes == "all":
        sections = list(SECTIONS)
    else:
        sections = []
        for s in (s.strip() for s in args.shapes.split(",")):
            if s in SECTIONS:
                sections.append(s)
            elif s in ALIASES:
                sections += ALIASES[s]
            else:
                raise SystemExit(f"unknown shape {s!r}; choose from {list(SECTIONS) + list(ALIASES)} or 'all'")
        sections = [s for s in SECTIONS if s in sections]
    if not sections:
        print("bench_masked_conv: no section selected (its shapes are 'layers' and 'stem')")
        return
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    args.malloc_policy = H.configure_malloc(args.malloc)
    for dev in H.devices(args.device):
        run_device(dev, sections, args)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.bench_masked_conv", description=__doc__.splitlines()[0])
    H.add_common_args(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
