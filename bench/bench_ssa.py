"""Spiking self-attention benchmark: spikeops vs eager PyTorch (+ SpikingJelly's LIF neuron).

Measured, side by side in one run, for each device (CPU; CUDA when available, the same code on
CUDA tensors, where ``backend="auto"`` picks Triton), as the median of ``--repeats`` wall-clock
times in ms, with the fastest call next to it (rows marked slow - the eager python loops and
everything with a backward - get a quarter of the repeats, >= 3; the rows of one table are timed
round-robin, see :func:`bench.harness.time_interleaved`, so that load from other processes hits
them alike):

* **spike_matmul** (per attention shape): ``spikeops.spike_matmul(a, b)`` (0/1 fp32 in, exact
  int32 out; C++ packs both operands first, included; Triton multiplies the floats) vs eager fp32 ``a @ b`` for both association orders of attention,
  ``Q K^T`` ([..., N, d] @ [..., d, N]) and ``K^T V`` ([..., d, N] @ [..., N, d]);
* **ssa fwd** (inference, ``torch.no_grad()``): ``spikeops.ssa(q, k, v)`` vs the eager fp32 path
  with the attention neuron, ``lif((q @ k^T) @ v * 0.125)`` and ``lif(q @ (k^T @ v) * 0.125)``,
  where lif is SpikingJelly's ``LIFNode(tau=2, v_threshold=0.5, detach_reset=True, Sigmoid(),
  step_mode="m")`` (reset before each call) or a plain python LIF loop (rows without
  SpikingJelly); plus a floor: read q, k, v once and write one output,
  ``torch.addcmul(q, k, v, out=preallocated)``;
* **ssa fwd+bwd**: q, k, v require grad, forward then ``torch.autograd.grad`` with a random
  grad; with the bytes saved for backward (``spikeops.memory.saved_bytes``);
* **Triton backward alone** (CUDA, d <= 64): the fused backward kernel vs the unfused path
  (unpack, the LIF kernels, torch matmuls) on the same saved words and grad, and the largest
  difference between their gradients;
* **pack**: ``spikeops.pack_spikes(x)`` / ``unpack_spikes(p)`` for x [4, 32, 196, 384] fp32
  spikes, GB/s of fp32 read (pack) / written (unpack), vs ``x.clone()`` and ``out.copy_(x)``;
* **block**: a Spikformer block (D=384, N=64, T=4, B=8, 12 heads) from spikeops layers
  (``SpikingSelfAttention`` + ``SpikingMLP``) vs the eager one (``nn.Linear`` + ``BatchNorm1d``
  + SpikingJelly ``LIFNode``, eager matmul attention), same weights: bytes saved for backward
  (with and without the parameters that ops save) and fwd / fwd+bwd time.

Attention shapes (``--shapes``): ``cifar`` (T=4, B=8, H=12, N=64, d=32) and ``imagenet`` (T=4,
B=8, H=8, N=196, d=64), q, k, v random spikes of density 0.2 shaped [T, B, H, N, d]; the
sections ``pack`` and ``block`` are selected the same way. The shape names that other bench
modules use (``python -m bench.run --shapes main``) map to: ``small`` -> cifar, ``main`` ->
everything, ``large`` -> nothing here.

On CPU the issue's targets are checked (pass/fail): ssa fwd >= 6x faster than the eager fp32
path with SpikingJelly's attention neuron, for each order and shape; spikeops block saves <= 35%
of the eager block's bytes. CPU timings use ``--malloc warm`` by default (see
:func:`bench.harness.configure_malloc`). Results: markdown on stdout, JSON in
``bench/results/ssa_<device>.json``.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

import spikeops
from bench import harness as H
from bench.eager import SJ_ERROR, py_lif, reset, sjlif
from spikeops.ops.known_counts import add_counts, mark_counts

ATTN_SHAPES = {"cifar": (4, 8, 12, 64, 32), "imagenet": (4, 8, 8, 196, 64)}  # T, B, H, N, d
PACK_SHAPE = (4, 32, 196, 384)
BLOCK_T, BLOCK_B, BLOCK_N, BLOCK_D, BLOCK_HEADS = 4, 8, 64, 384, 12
SECTIONS = ("cifar", "imagenet", "pack", "block")
ALIASES = {"small": ("cifar",), "main": SECTIONS, "large": ()}  # names other bench modules use
DENSITY = 0.2
SCALE, ATTN_TH, TAU, ALPHA = 0.125, 0.5, 2.0, 4.0
SPEEDUP_TARGET, SAVED_TARGET = 6.0, 0.35

FLOOR = "floor: addcmul(q, k, v, out=o)"
SPIKEOPS_SSA = "spikeops.ssa"
ORDERS = {"(QK^T)V": lambda q, kt, v: (q @ kt) @ v, "Q(K^TV)": lambda q, kt, v: q @ (kt @ v)}

# ----------------------------------------------------------------------------- blocks

class Block(nn.Module):
    """Spikformer block from spikeops layers, residual sums by ``add_counts`` as in spikeops.models
    (so the MLP knows its input holds counts 0..2 without checking it)."""

    def __init__(self, D: int = BLOCK_D, heads: int = BLOCK_HEADS):
        super().__init__()
        self.attn = spikeops.nn.SpikingSelfAttention(D, heads)
        self.mlp = spikeops.nn.SpikingMLP(D, 4 * D)

    def forward(self, x):
        x = add_counts(x, self.attn(x))
        return add_counts(x, self.mlp(x))


class EagerLBL(nn.Module):
    def __init__(self, i, o, bias):
        super().__init__()
        self.l, self.bn, self.lif = nn.Linear(i, o, bias=bias), nn.BatchNorm1d(o), sjlif()

    def forward(self, x):
        y = self.l(x)
        y = self.bn(y.reshape(-1, y.shape[-1])).view(y.shape)
        return self.lif(y)


class EagerBlock(nn.Module):
    """The same block from nn.Linear + BatchNorm1d + SpikingJelly LIFNode, eager matmul attention."""

    def __init__(self, D: int = BLOCK_D, heads: int = BLOCK_HEADS):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.p = (EagerLBL(D, D, False), EagerLBL(D, D, False), EagerLBL(D, D, False),
                                          EagerLBL(D, D, True))
        self.attn_lif = sjlif(ATTN_TH)
        self.f1, self.f2 = EagerLBL(D, 4 * D, True), EagerLBL(4 * D, D, True)

    def forward(self, x):
        T, B, N, C = x.shape
        q, k, v = [m(x).view(T, B, N, self.heads, C // self.heads).transpose(2, 3) for m in (self.q, self.k, self.v)]
        a = self.attn_lif((q @ k.transpose(-2, -1) @ v) * SCALE)
        x = x + self.p(a.transpose(2, 3).reshape(T, B, N, C))
        return x + self.f2(self.f1(x))


def copy_weights(sp: Block, ea: EagerBlock) -> Optional[str]:
    """Give the eager block the spikeops block's weights (same spikes -> same work); None or why not."""
    pairs = [(sp.attn.q, ea.q), (sp.attn.k, ea.k), (sp.attn.v, ea.v), (sp.attn.proj, ea.p),
             (sp.mlp.fc1, ea.f1), (sp.mlp.fc2, ea.f2)]
    try:
        with torch.no_grad():
            for s, e in pairs:
                e.l.load_state_dict(s.linear.state_dict())
                e.bn.load_state_dict(s.bn.state_dict())
    except Exception as exc:  # noqa: BLE001 - the layers may change; timings stay comparable
        return error_string(exc)
    return None


# ----------------------------------------------------------------------------- measuring

@dataclass
class Row:
    name: str
    fn: Callable[[], object]
    slow: bool = False


def error_string(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300]


def repeats_for(slow: bool, args) -> int:
    return min(args.repeats, max(3, args.repeats // 4)) if slow else args.repeats


def measure(rows: list[Row], args, dev: torch.device) -> dict[str, dict]:
    """Median ms of each row, the rows timed round-robin (errors are recorded, not raised)."""
    reps = {r.name: repeats_for(r.slow, args) for r in rows}
    times = H.time_interleaved({r.name: r.fn for r in rows}, reps, args.warmup, dev)
    out = {}
    for r in rows:
        t = times[r.name]
        ok = isinstance(t, list) and t
        out[r.name] = {"ms": H.median(t) if ok else None, "min_ms": min(t) if ok else None, "repeats": reps[r.name],
                       "error": None if ok else error_string(t) if isinstance(t, BaseException) else "no timings"}
    return out


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def spikes(shape, gen: torch.Generator, dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return (torch.rand(shape, generator=gen) < DENSITY).to(dev, dtype)


def mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of elements that differ (0.0 = identical)."""
    return (a.float() != b.float()).float().mean().item()


def try_call(fn: Callable[[], object]):
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001
        return None, error_string(exc)


def saved_mb(fn: Callable[[], object]) -> tuple[Optional[float], Optional[str]]:
    try:
        return spikeops.memory.saved_bytes(fn) / 1e6, None
    except Exception as exc:  # noqa: BLE001
        return None, error_string(exc)


# ----------------------------------------------------------------------------- sections

def bench_matmul(q, k, v, args) -> dict:
    dev = q.device
    kt = k.transpose(-2, -1)
    products = {"Q K^T": (q, kt), "K^T V": (kt, v)}
    rows = []
    for prod, (a, b) in products.items():
        rows += [Row(f"{prod} spikeops", lambda a=a, b=b: spikeops.spike_matmul(a, b)),
                 Row(f"{prod} eager", lambda a=a, b=b: a @ b)]
    times = measure(rows, args, dev)
    out = {}
    for prod, (a, b) in products.items():
        sp, ea = times[f"{prod} spikeops"], times[f"{prod} eager"]
        got, err = try_call(lambda: spikeops.spike_matmul(a, b))
        exact = None if got is None else bool(torch.equal(got, (a @ b).to(torch.int32)))
        out[prod] = {"a_shape": list(a.shape), "b_shape": list(b.shape), "spikeops": sp, "eager": ea,
                     "eager_over_spikeops": ratio(ea["ms"], sp["ms"]), "exact": exact,
                     "error": sp["error"] or err}
    return out


def bench_ssa(q, k, v, args) -> dict:
    dev = q.device
    lif = sjlif(ATTN_TH).to(dev)

    def eager(order: str, neuron: str):
        prod = ORDERS[order]

        def fn(q=q, k=k, v=v):
            y = prod(q, k.transpose(-2, -1), v) * SCALE
            if neuron == "SJ":
                reset(lif)
                return lif(y)
            return py_lif(y, ATTN_TH)
        return fn

    neurons = (["SJ"] if SJ_ERROR is None else []) + ["py"]
    eager_rows = {f"eager {o} + {n} LIF": eager(o, n) for n in neurons for o in ORDERS}
    o = torch.empty_like(q)

    # forward, no grad
    fwd_rows = [Row(FLOOR, lambda: torch.addcmul(q, k, v, out=o)), Row(SPIKEOPS_SSA, lambda: spikeops.ssa(q, k, v))]
    fwd_rows += [Row(n, f, slow=True) for n, f in eager_rows.items()]
    with torch.no_grad():
        fwd = measure(fwd_rows, args, dev)
        ref, ref_err = try_call(lambda: spikeops.ssa(q, k, v))
        for name, f in eager_rows.items():
            got, err = try_call(f)
            fwd[name]["mismatch_vs_spikeops"] = None if ref is None or got is None else mismatch(got, ref)
            fwd[name]["error"] = fwd[name]["error"] or err
    if ref_err:
        fwd[SPIKEOPS_SSA]["error"] = fwd[SPIKEOPS_SSA]["error"] or ref_err
    floor, sp = fwd[FLOOR]["ms"], fwd[SPIKEOPS_SSA]["ms"]
    for r in fwd.values():
        r["over_floor"] = ratio(r["ms"], floor)
        r["over_spikeops"] = ratio(r["ms"], sp)

    # forward + backward
    qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dev, q.dtype)

    def fb(f):
        return lambda: torch.autograd.grad(f(qg, kg, vg), (qg, kg, vg), g)

    fb_fns = {SPIKEOPS_SSA: spikeops.ssa}
    fb_fns.update({n: eager(n.split()[1], n.split()[3]) for n in eager_rows})
    fwd_bwd = measure([Row(name, fb(f), slow=True) for name, f in fb_fns.items()], args, dev)
    for name, f in fb_fns.items():
        fwd_bwd[name]["saved_mb"], err = saved_mb(lambda f=f: f(qg, kg, vg))
        fwd_bwd[name]["error"] = fwd_bwd[name]["error"] or err
    sp_fb = fwd_bwd[SPIKEOPS_SSA]["ms"]
    for r in fwd_bwd.values():
        r["over_spikeops"] = ratio(r["ms"], sp_fb)
    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def bench_triton_backward(q, k, v, args) -> Optional[dict]:
    """CUDA: the Triton SSA backward's two paths on the same saved words and grad (the fused kernel,
    which ``spikeops.ssa`` takes for d <= 64, and unpack + LIF kernels + matmuls), and how far apart
    their gradients are; None elsewhere."""
    from spikeops.triton import ssa as triton_ssa

    T, B, Hh, N, d = q.shape
    if q.device.type != "cuda" or d > triton_ssa.FUSED_BACKWARD_MAX_D:
        return None
    flat = [x.reshape(T, B * Hh, N, d) for x in (q, k, v)]
    _, qw, kw, vw, _ = triton_ssa.ssa_forward(*flat, SCALE, ATTN_TH, TAU, True)
    g = torch.randn(flat[0].shape, generator=torch.Generator().manual_seed(2)).to(q.device)
    paths = {"triton fused kernel": triton_ssa.ssa_backward_fused,
             "triton unpack + LIF kernels + matmuls": triton_ssa.ssa_backward_unfused}
    res = measure([Row(n, lambda f=f: f(g, qw, kw, vw, SCALE, ATTN_TH, TAU)) for n, f in paths.items()], args,
                  q.device)
    got = [f(g, qw, kw, vw, SCALE, ATTN_TH, TAU) for f in paths.values()]
    res["max_diff_over_scale"] = max(float((a - b).abs().max() / (b.abs().max() + 1e-30)) for a, b in zip(*got))
    return res


def bench_pack(dev: torch.device, dtype: torch.dtype, args) -> dict:
    x = spikes(PACK_SHAPE, torch.Generator().manual_seed(2), dev, dtype)
    out = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    packed, perr = try_call(lambda: spikeops.pack_spikes(x))
    rows = [Row("x.clone() [floor]", lambda: x.clone()), Row("out.copy_(x) [floor]", lambda: out.copy_(x)),
            Row("pack_spikes(x)", lambda: spikeops.pack_spikes(x)),
            Row("pack_spikes(x, check=False)", lambda: spikeops.pack_spikes(x, check=False)),
            Row("unpack_spikes(p)", lambda: spikeops.unpack_spikes(packed))]
    res = measure(rows, args, dev)
    words_bytes = None if packed is None else packed.words.numel() * packed.words.element_size()
    clone = res["x.clone() [floor]"]["ms"]
    for name, r in res.items():
        r["fp32_gb_s"] = nbytes / (r["ms"] * 1e6) if r["ms"] else None  # fp32 side read or written
        moved = 2 * nbytes if "[floor]" in name else (nbytes + words_bytes if words_bytes else None)
        r["total_gb_s"] = moved / (r["ms"] * 1e6) if r["ms"] and moved else None
        r["over_clone"] = ratio(r["ms"], clone)
    roundtrip, err = try_call(lambda: bool(torch.equal(spikeops.unpack_spikes(packed), x)))
    if perr:
        res["pack_spikes(x)"]["error"] = res["pack_spikes(x)"]["error"] or perr
    return {"shape": list(PACK_SHAPE), "input_mb": nbytes / 1e6,
            "packed_mb": None if words_bytes is None else words_bytes / 1e6,
            "roundtrip_exact": roundtrip, "roundtrip_error": err, "results": res}


def bench_block(dev: torch.device, dtype: torch.dtype, args) -> dict:
    torch.manual_seed(0)
    res, note = {}, None
    try:
        sp = Block().to(dev, dtype)
    except Exception as exc:  # noqa: BLE001
        sp, res["spikeops Block"] = None, {"error": error_string(exc)}
    ea = EagerBlock().to(dev, dtype)
    if sp is not None:
        note = copy_weights(sp, ea)
    shape = (BLOCK_T, BLOCK_B, BLOCK_N, BLOCK_D)
    # spikes as a spikeops layer hands them on inside a model (known: no value check, see known_counts)
    x = mark_counts(spikes(shape, torch.Generator().manual_seed(3), dev, dtype).requires_grad_(True))
    g = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(dev, dtype)

    def call(m):
        def fn(inp):
            reset(m)
            return m(inp)
        return fn

    models = {"eager Block (nn.Linear+BN+SJ LIF)": ea}
    if sp is not None:
        models = {"spikeops Block": sp, **models}
    fwd_rows, fwd_bwd_rows = [], []
    for name, m in models.items():
        f, params = call(m), list(m.parameters())

        def fwd(f=f):
            with torch.no_grad():
                return f(x)

        def fwd_bwd(f=f, params=params):
            return torch.autograd.grad(f(x), [x] + params, g)

        fwd_rows.append(Row(name, fwd, slow=True))
        fwd_bwd_rows.append(Row(name, fwd_bwd, slow=True))
    fwd_times, fwd_bwd_times = measure(fwd_rows, args, dev), measure(fwd_bwd_rows, args, dev)
    for name, m in models.items():
        f, params = call(m), list(m.parameters())
        r = {"fwd": fwd_times[name], "fwd_bwd": fwd_bwd_times[name], "error": None}
        r["fwd_ms"], r["fwd_bwd_ms"] = r["fwd"]["ms"], r["fwd_bwd"]["ms"]
        r["error"] = r["fwd"]["error"] or r["fwd_bwd"]["error"]
        try:
            rep = spikeops.memory.saved_tensors_report(f, x)
            r["saved_mb"], r["saved_storages"] = rep.total / 1e6, rep.storages
            r["saved_mb_by_dtype"] = {str(k).removeprefix("torch."): v / 1e6 for k, v in rep.by_dtype.items()}
            r["saved_mb_excl_params"] = H.saved_bytes(lambda f=f: f(x), exclude=params)[0] / 1e6
        except Exception as exc:  # noqa: BLE001
            r["saved_mb"] = r["saved_mb_excl_params"] = None
            r["error"] = r["error"] or error_string(exc)
        r["param_mb"] = sum(p.numel() * p.element_size() for p in params) / 1e6
        res[name] = r
    names = list(res)
    eager = res[names[-1]]
    for r in res.values():
        r["saved_over_eager"] = ratio(r.get("saved_mb"), eager.get("saved_mb"))
        r["saved_excl_params_over_eager"] = ratio(r.get("saved_mb_excl_params"), eager.get("saved_mb_excl_params"))
        r["fwd_bwd_over_eager"] = ratio(r.get("fwd_bwd_ms"), eager.get("fwd_bwd_ms"))
    return {"T": BLOCK_T, "B": BLOCK_B, "N": BLOCK_N, "D": BLOCK_D, "heads": BLOCK_HEADS,
            "eager_neuron": "SpikingJelly LIFNode" if SJ_ERROR is None else "python LIF (SpikingJelly missing)",
            "same_weights": note is None, "copy_weights_error": note, "results": res}


# ----------------------------------------------------------------------------- targets and printing

def targets(payload: dict, dev: torch.device) -> list[dict]:
    checks = []
    if dev.type == "cpu":
        neuron = "SJ" if SJ_ERROR is None else "py"
        for shape, entry in payload["shapes"].items():
            if shape not in ATTN_SHAPES or "ssa" not in entry:
                continue
            for order in ORDERS:
                v = entry["ssa"]["fwd"].get(f"eager {order} + {neuron} LIF", {}).get("over_spikeops")
                checks.append((f"{shape}: eager {order} + {neuron} LIF fwd / spikeops.ssa fwd", v,
                               f">= {SPEEDUP_TARGET:g}", lambda x: x >= SPEEDUP_TARGET))
    block = payload["shapes"].get("block")
    if block:
        sp = block["results"].get("spikeops Block", {})
        checks.append(("block: spikeops saved bytes / eager saved bytes", sp.get("saved_over_eager"),
                       f"<= {SAVED_TARGET:g}", lambda x: x <= SAVED_TARGET))
    return [{"check": c, "value": v, "target": t, "pass": None if v is None else ok(v)} for c, v, t, ok in checks]


def print_errors(rows: dict) -> None:
    notes = [f"* {n}: ERROR {r['error']}" for n, r in rows.items() if r.get("error")]
    if notes:
        print("\n" + "\n".join(notes))


def print_attention(dev, name: str, entry: dict) -> None:
    T, B, Hh, N, d = entry["shape"]
    print(f"\n## SSA on {dev} | {name}: T={T} B={B} H={Hh} N={N} d={d} {entry['dtype']}, spike density {DENSITY} "
          f"| {torch.get_num_threads()} threads | malloc {entry['malloc']}\n")
    mm = entry["matmul"]
    print("spike_matmul (exact int32, the 0/1 check and any packing included) vs eager fp32 a @ b:\n")
    print(H.markdown_table(
        ["product", "a @ b", "spikeops ms", "eager ms", "eager/spikeops", "exact", "repeats"],
        [[p, f"{r['a_shape'][-2:]} @ {r['b_shape'][-2:]}", H.fmt(r["spikeops"]["ms"], 3), H.fmt(r["eager"]["ms"], 3),
          H.fmt(r["eager_over_spikeops"]), H.fmt(r["exact"]), r["spikeops"]["repeats"]] for p, r in mm.items()]))
    for p, r in mm.items():
        if r["error"] or r["eager"]["error"]:
            print(f"* {p}: ERROR {r['error'] or r['eager']['error']}")
    fwd, fb = entry["ssa"]["fwd"], entry["ssa"]["fwd_bwd"]
    print("\nssa forward (no grad; eager = fp32 matmuls + attention LIF, th 0.5, scale 0.125):\n")
    print(H.markdown_table(
        ["implementation", "fwd ms", "min ms", "/floor", "/spikeops", "spikes differ", "repeats"],
        [[n, H.fmt(r["ms"], 3), H.fmt(r["min_ms"], 3), H.fmt(r["over_floor"]), H.fmt(r["over_spikeops"]),
          "-" if r.get("mismatch_vs_spikeops") is None else f"{r['mismatch_vs_spikeops']:.2%}", r["repeats"]]
         for n, r in fwd.items()]))
    print_errors(fwd)
    print("\nssa forward+backward (q, k, v require grad; random grad):\n")
    print(H.markdown_table(
        ["implementation", "fwd+bwd ms", "min ms", "/spikeops", "saved MB", "repeats"],
        [[n, H.fmt(r["ms"], 3), H.fmt(r["min_ms"], 3), H.fmt(r["over_spikeops"]), H.fmt(r["saved_mb"], 2), r["repeats"]]
         for n, r in fb.items()]))
    print_errors(fb)
    tb = entry.get("triton_backward")
    if tb:
        rows = {n: r for n, r in tb.items() if isinstance(r, dict)}
        print("\nTriton ssa backward alone (saved words + a random grad -> dq, dk, dv):\n")
        print(H.markdown_table(["path", "ms", "min ms", "repeats"],
                               [[n, H.fmt(r["ms"], 3), H.fmt(r["min_ms"], 3), r["repeats"]] for n, r in rows.items()]))
        print(f"\nlargest difference between the two, relative to the gradient's scale: {tb['max_diff_over_scale']:.1e}")
        print_errors(rows)


def print_pack(dev, entry: dict) -> None:
    print(f"\n## pack/unpack on {dev} | x {entry['shape']} fp32 spikes ({entry['input_mb']:.1f} MB -> "
          f"{H.fmt(entry['packed_mb'])} MB packed) | round trip exact: {H.fmt(entry['roundtrip_exact'])}\n")
    print(H.markdown_table(
        ["op", "ms", "/clone", "fp32 GB/s", "total GB/s", "repeats"],
        [[n, H.fmt(r["ms"], 3), H.fmt(r["over_clone"]), H.fmt(r["fp32_gb_s"], 1), H.fmt(r["total_gb_s"], 1),
          r["repeats"]] for n, r in entry["results"].items()]))
    print("\nfp32 GB/s: bytes of the fp32 tensor read (pack, clone) or written (unpack) per second; "
          "total: all bytes read + written.")
    print_errors(entry["results"])
    if entry["roundtrip_error"]:
        print(f"* round trip: ERROR {entry['roundtrip_error']}")


def print_block(dev, entry: dict) -> None:
    print(f"\n## Spikformer block on {dev} | x [T={entry['T']}, B={entry['B']}, N={entry['N']}, D={entry['D']}] "
          f"spikes, {entry['heads']} heads, train mode | eager neuron: {entry['eager_neuron']} | "
          f"same weights: {H.fmt(entry['same_weights'])}\n")
    res = entry["results"]
    print(H.markdown_table(
        ["block", "saved MB", "/eager", "saved MB excl. params", "/eager", "fwd ms", "fwd+bwd ms", "/eager", "repeats"],
        [[n, H.fmt(r.get("saved_mb"), 2), H.fmt(r.get("saved_over_eager"), 3), H.fmt(r.get("saved_mb_excl_params"), 2),
          H.fmt(r.get("saved_excl_params_over_eager"), 3), H.fmt(r.get("fwd_ms")), H.fmt(r.get("fwd_bwd_ms")),
          H.fmt(r.get("fwd_bwd_over_eager")), r.get("fwd", {}).get("repeats", "-")] for n, r in res.items()]))
    for n, r in res.items():
        if r.get("saved_mb_by_dtype"):
            split = ", ".join(f"{k} {v:.2f}" for k, v in r["saved_mb_by_dtype"].items())
            print(f"\n* {n}: saved MB by dtype: {split}; parameters {r['param_mb']:.2f} MB")
    print_errors(res)
    if entry["copy_weights_error"]:
        print(f"* weights not copied: {entry['copy_weights_error']}")


def print_targets(checks: list[dict]) -> None:
    if checks:
        print("\nIssue targets:\n")
        print(H.markdown_table(["check", "value", "target", "pass"],
                               [[t["check"], H.fmt(t["value"], 3), t["target"], H.fmt(t["pass"])] for t in checks]))


# ----------------------------------------------------------------------------- driver

def sj_version() -> Optional[str]:
    try:
        return importlib.metadata.version("spikingjelly")
    except importlib.metadata.PackageNotFoundError:
        return None


def select(shapes: str, standalone: bool) -> list[str]:
    if shapes == "all":
        return list(SECTIONS)
    names: list[str] = []
    for s in (s.strip() for s in shapes.split(",")):
        if s in SECTIONS:
            names.append(s)
        elif s in ALIASES:
            names += ALIASES[s]
        elif standalone:
            raise SystemExit(f"unknown shape(s) {s!r}; choose from {list(SECTIONS)}, {list(ALIASES)} or 'all'")
    return [s for s in SECTIONS if s in names]


def run_device(dev: torch.device, names: list[str], args) -> dict:
    dtype = getattr(torch, args.dtype)
    payload = H.run_header(dev)
    malloc = args.malloc_policy if dev.type == "cpu" else "cuda caching allocator"
    payload.update(benchmark="ssa", dtype=args.dtype, repeats=args.repeats, warmup=args.warmup, malloc=malloc,
                   density=DENSITY, attention=dict(scale=SCALE, v_threshold=ATTN_TH, tau=TAU, detach_reset=True,
                                                   surrogate="sigmoid", alpha=ALPHA),
                   spikingjelly=sj_version(), spikingjelly_error=SJ_ERROR, shapes={})
    t_start = time.perf_counter()
    for name in names:
        if name in ATTN_SHAPES:
            gen = torch.Generator().manual_seed(0)
            q, k, v = (spikes(ATTN_SHAPES[name], gen, dev, dtype) for _ in range(3))
            entry = {"shape": list(ATTN_SHAPES[name]), "dtype": args.dtype, "malloc": malloc,
                     "matmul": bench_matmul(q, k, v, args), "ssa": bench_ssa(q, k, v, args),
                     "triton_backward": bench_triton_backward(q, k, v, args)}
            print_attention(dev, name, entry)
        elif name == "pack":
            entry = bench_pack(dev, dtype, args)
            print_pack(dev, entry)
        else:
            entry = bench_block(dev, dtype, args)
            print_block(dev, entry)
        entry["other_cpu_busy_after"] = H.other_cpu_busy(0.25)  # others' load while we ran shows as noise
        payload["shapes"][name] = entry
    payload["targets"] = targets(payload, dev)
    payload["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    print_targets(payload["targets"])
    busy_after = {n: e["other_cpu_busy_after"] for n, e in payload["shapes"].items()}
    if any(b is not None and b > 0.2 for b in busy_after.values()):
        print(f"\nwarning: other processes were busy after some sections ({busy_after}); timings may be noisy")
    path = H.write_json(f"ssa_{dev.type}", payload)
    print(f"\nwrote {path} ({payload['elapsed_s']} s)")
    return payload


def run(args: argparse.Namespace) -> None:
    """Benchmark every selected section on every selected device (flags: harness.add_common_args)."""
    names = select(args.shapes, standalone=not hasattr(args, "only"))
    if not names:
        print(f"bench_ssa: no SSA sections for --shapes {args.shapes} (have {list(SECTIONS)}); skipped")
        return
    args.malloc_policy = getattr(args, "malloc_policy", None) or H.configure_malloc(args.malloc)
    if SJ_ERROR:
        print(f"SpikingJelly not importable ({SJ_ERROR}): SpikingJelly rows skipped, eager block uses a python LIF")
    for dev in H.devices(args.device):
        run_device(dev, names, args)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.bench_ssa", description=__doc__.splitlines()[0])
    run(H.add_common_args(parser).parse_args(argv))


if __name__ == "__main__":
    main()
