"""Token attention (QKFormer) / MSSA (MSViT) benchmark: spikeops vs eager PyTorch (+ SpikingJelly's LIF neuron).

Measured, side by side in one run, for each device (CPU; CUDA when available, the same code on
CUDA tensors, where ``backend="auto"`` picks Triton), as the median of ``--repeats`` wall-clock
times in ms (the rows of one table are timed round-robin, see
:func:`bench.harness.time_interleaved`, so that load from other processes hits them alike; the
module rows, ~1 s a call on CPU, are marked slow and get a quarter of the repeats, >= 3):

* **op fwd** (inference, ``torch.no_grad()``), with p (MSSA: ``S = sum_c Q + sum_c P``) and
  without (QKFormer: ``S = sum_c Q``): ``spikeops.token_attention(q, k[, p])`` vs eager PyTorch
  as separate ops, ``s = q.sum(-1, keepdim=True) (+ p.sum(-1, keepdim=True))``, ``a = LIF(s)``,
  ``out = a * k``, where LIF is SpikingJelly's ``LIFNode(tau=2, v_threshold=0.5,
  detach_reset=True, Sigmoid(), step_mode="m")`` (``functional.reset_net`` before each call) or
  a plain python LIF loop (same equations); plus a floor that reads the inputs once and writes
  one output (``torch.addcmul(q, k, p, out=o)`` / ``torch.mul(q, k, out=o)``). The outputs are
  compared with spikeops' (fraction of spikes that differ; 0 = identical);
* **op fwd+bwd**: q, k (, p) require grad, forward then ``torch.autograd.grad`` with a random
  grad; with the bytes saved for backward (``spikeops.memory.saved_bytes``) and the largest
  difference of the input grads from spikeops'. Note that eager's q / p grads are the broadcast
  views that ``sum``'s backward returns, spikeops' are materialised tensors;
* **module** (``--shapes module``): ``spikeops.nn.MultiScaleSpikingAttention(192, 8)`` and
  ``QKTokenAttention(192, 8)`` on x [T=4, B=4, C=192, N=1024] spikes, train mode, vs the same
  blocks from eager parts (``nn.Conv1d`` + ``BatchNorm1d`` + SpikingJelly ``LIFNode``, eager
  sum / LIF / multiply attention) with the same weights: fwd / fwd+bwd time (grads of x and the
  parameters), bytes saved for backward (with and without the parameters that ops save) and the
  fraction of output spikes that differ.

Op shapes (``--shapes``), MSViT stage 1 (D/2 = 192 channels, 8 heads, d = 24, T = 4), q, k, p
random spikes of density 0.15 shaped [T, B, H, N, d]: ``cifar`` (N = 1024 tokens, B = 8; one eager
fwd+bwd takes well under 2 s on 2 CPU cores, so the full training batch is kept) and ``imagenet``
(N = 3136 tokens = 56x56, B = 2); ``cifar_modules_layout``: the cifar shape as the modules hold it,
[T, B, H, N, d] views of contiguous [T, B, H, d, N] tensors (heads of [T, B, C, N] conv1d
outputs; the C++ backend has kernels for that layout, eager runs on the same views). The shape names that other bench modules use (``python -m
bench.run --shapes main``) map to: ``small`` -> cifar, ``main`` -> everything, ``large`` -> nothing
here; other unknown names are skipped under ``bench.run``.

Shared CPUs: the eager rows run ~20 (fwd) to ~70 (fwd+bwd) small ops, each split over the torch
threads; when other processes hold the cores, every such op can wait a scheduler slice (~5-10 ms)
for its second thread, so eager times inflate far more than spikeops' few kernels (seen: eager
fwd+bwd 10x slower in one table, spikeops unchanged). Round-robin timing does not cancel that. The
tables show each row's fastest call next to the median (the JSON also the slowest); for numbers
that do not depend on the load, run on an idle machine or with one thread (``OMP_NUM_THREADS=1
python -m bench.bench_token_attention``; ``machine.torch_threads`` in the JSON records it).

On CPU the issue's target is checked (pass/fail): eager fwd+bwd (SpikingJelly LIF) / spikeops
fwd+bwd >= 4x, per shape, with and without p; on every device the op's spikes must equal eager's.
CPU timings use ``--malloc warm`` by default (see :func:`bench.harness.configure_malloc`).
Results: markdown on stdout, JSON in ``bench/results/token_attention_<device>.json``.
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
from spikeops.ops.known_counts import mark_counts

OP_SHAPES = {"cifar": (4, 8, 8, 1024, 24), "imagenet": (4, 2, 8, 3136, 24),  # T, B, H, N, d
             "cifar_modules_layout": (4, 8, 8, 1024, 24)}
CHANNELS_FIRST = {"cifar_modules_layout"}  # [T, B, H, N, d] views of contiguous [T, B, H, d, N]
MODULE_SHAPE, MODULE_DIM, MODULE_HEADS = (4, 4, 192, 1024), 192, 8  # x [T, B, C, N]
SECTIONS = ("cifar", "imagenet", "cifar_modules_layout", "module")
ALIASES = {"small": ("cifar",), "main": SECTIONS, "large": ()}  # names other bench modules use
VARIANTS = {"MSSA (q, k, p)": True, "QK (q, k)": False}  # name -> with p
DENSITY = 0.15
ATTN_TH, TAU, ALPHA = 0.5, 2.0, 4.0
SPEEDUP_TARGET = 4.0

SPIKEOPS = "spikeops.token_attention"
EAGER_SJ, EAGER_PY = "eager sum + SJ LIFNode + mul", "eager sum + python LIF + mul"

def eager_attention(q, k, p, neuron: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The op as separate eager ops: per token sum q (and p) over the head's channels, LIF, mask k."""
    s = q.sum(-1, keepdim=True)
    if p is not None:
        s = s + p.sum(-1, keepdim=True)
    return neuron(s) * k


# ----------------------------------------------------------------------------- eager blocks

class EagerConvBNLIF(nn.Module):
    """``LIF(BN(nn.Conv1d(x)))`` on ``[T, B, C, N]`` with SpikingJelly's LIFNode (v_th 1)."""

    def __init__(self, i: int, o: int, kernel_size: int = 1, bias: bool = False):
        super().__init__()
        self.conv = nn.Conv1d(i, o, kernel_size, padding=kernel_size // 2, bias=bias)
        self.bn, self.lif = nn.BatchNorm1d(o), sjlif(1.0)

    def forward(self, x):
        T, B = x.shape[:2]
        y = self.bn(self.conv(x.flatten(0, 1)))
        return self.lif(y.view(T, B, *y.shape[1:]))


class EagerTokenAttention(nn.Module):
    """QKTokenAttention (``p_kernel_size=None``) / MSSA from eager parts, eager sum/LIF/multiply attention."""

    def __init__(self, dim: int, heads: int, p_kernel_size: Optional[int]):
        super().__init__()
        self.heads = heads
        self.q, self.k = EagerConvBNLIF(dim, dim), EagerConvBNLIF(dim, dim)
        self.p = EagerConvBNLIF(dim, dim, p_kernel_size) if p_kernel_size else None
        self.proj = EagerConvBNLIF(dim, dim, 1, bias=True)
        self.attn_lif = sjlif(ATTN_TH)

    def forward(self, x):
        T, B, C, N = x.shape

        def heads(t):  # [T, B, C, N] -> [T, B, H, N, d]
            return t.view(T, B, self.heads, C // self.heads, N).transpose(-1, -2)

        p = heads(self.p(x)) if self.p is not None else None
        a = eager_attention(heads(self.q(x)), heads(self.k(x)), p, self.attn_lif)
        return self.proj(a.transpose(-1, -2).reshape(T, B, C, N))


def copy_weights(sp: nn.Module, ea: EagerTokenAttention) -> Optional[str]:
    """Give the eager block the spikeops block's weights (same spikes -> same work); None or why not."""
    names = ["q", "k", "proj"] + (["p"] if ea.p is not None else [])
    try:
        with torch.no_grad():
            for n in names:
                s, e = getattr(sp, n), getattr(ea, n)
                e.conv.load_state_dict(s.conv.state_dict())
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
        out[r.name] = {"ms": H.median(t) if ok else None, "min_ms": min(t) if ok else None,
                       "max_ms": max(t) if ok else None, "repeats": reps[r.name],
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

def bench_op(q, k, p, args) -> dict:
    """One variant (p given: MSSA; None: QK) at one shape: fwd and fwd+bwd tables."""
    dev = q.device
    lif = sjlif(ATTN_TH).to(dev)

    def sj_neuron_fn(s):
        reset(lif)
        return lif(s)

    impls = {SPIKEOPS: lambda q, k, p: spikeops.token_attention(q, k, p)}
    if SJ_ERROR is None:
        impls[EAGER_SJ] = lambda q, k, p: eager_attention(q, k, p, sj_neuron_fn)
    impls[EAGER_PY] = lambda q, k, p: eager_attention(q, k, p, lambda s: py_lif(s, ATTN_TH))

    # forward, no grad
    o = torch.empty_like(q)
    floor_name = "floor: addcmul(q, k, p, out=o)" if p is not None else "floor: mul(q, k, out=o)"
    floor = (lambda: torch.addcmul(q, k, p, out=o)) if p is not None else (lambda: torch.mul(q, k, out=o))
    with torch.no_grad():
        fwd = measure([Row(floor_name, floor)] + [Row(n, lambda f=f: f(q, k, p)) for n, f in impls.items()],
                      args, dev)
        ref, ref_err = try_call(lambda: impls[SPIKEOPS](q, k, p))
        for name, f in impls.items():
            if name == SPIKEOPS:
                continue
            got, err = try_call(lambda f=f: f(q, k, p))
            fwd[name]["mismatch_vs_spikeops"] = None if ref is None or got is None else mismatch(got, ref)
            fwd[name]["error"] = fwd[name]["error"] or err
    if ref_err:
        fwd[SPIKEOPS]["error"] = fwd[SPIKEOPS]["error"] or ref_err
    fl, sp = fwd[floor_name]["ms"], fwd[SPIKEOPS]["ms"]
    for r in fwd.values():
        r["over_floor"] = ratio(r["ms"], fl)
        r["over_spikeops"] = ratio(r["ms"], sp)

    # forward + backward
    inputs = [x.detach().clone().requires_grad_(True) for x in ((q, k) if p is None else (q, k, p))]
    qg, kg = inputs[:2]
    pg = inputs[2] if p is not None else None
    # laid out like q (as a module's conv1d backward hands it back in the channels-first layout)
    g = torch.empty_like(q).copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(1)))

    def fb(f):
        return lambda: torch.autograd.grad(f(qg, kg, pg), inputs, g)

    fwd_bwd = measure([Row(n, fb(f)) for n, f in impls.items()], args, dev)
    ref_grads, ref_err = try_call(fb(impls[SPIKEOPS]))
    for name, f in impls.items():
        r = fwd_bwd[name]
        r["saved_mb"], err = saved_mb(lambda f=f: f(qg, kg, pg))
        r["error"] = r["error"] or err or (ref_err if name == SPIKEOPS else None)
        r["grad_max_abs_diff_vs_spikeops"] = None
        if name != SPIKEOPS and ref_grads is not None:
            grads, err = try_call(fb(f))
            r["error"] = r["error"] or err
            if grads is not None:
                r["grad_max_abs_diff_vs_spikeops"] = max((a.float() - b.float()).abs().max().item()
                                                         for a, b in zip(grads, ref_grads))
    sp_fb, sp_saved = fwd_bwd[SPIKEOPS]["ms"], fwd_bwd[SPIKEOPS]["saved_mb"]
    for r in fwd_bwd.values():
        r["over_spikeops"] = ratio(r["ms"], sp_fb)
        r["saved_over_spikeops"] = ratio(r["saved_mb"], sp_saved)
    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def bench_modules(dev: torch.device, dtype: torch.dtype, args) -> dict:
    # spikes as a spikeops layer hands them on inside a model (known: no value check, see known_counts)
    x = mark_counts(spikes(MODULE_SHAPE, torch.Generator().manual_seed(3), dev, dtype).requires_grad_(True))
    g = torch.randn(MODULE_SHAPE, generator=torch.Generator().manual_seed(4)).to(dev, dtype)
    blocks = {"MultiScaleSpikingAttention": (spikeops.nn.MultiScaleSpikingAttention, 3),
              "QKTokenAttention": (spikeops.nn.QKTokenAttention, None)}
    out = {}
    for block, (cls, p_ks) in blocks.items():
        torch.manual_seed(0)
        res, note, models = {}, None, {}
        try:
            models[f"spikeops {block}"] = cls(MODULE_DIM, MODULE_HEADS).to(dev, dtype)
        except Exception as exc:  # noqa: BLE001
            res[f"spikeops {block}"] = {"error": error_string(exc)}
        eager_name = "eager (Conv1d+BN+SJ LIF, eager attention)"
        ea = EagerTokenAttention(MODULE_DIM, MODULE_HEADS, p_ks).to(dev, dtype)
        if models:
            note = copy_weights(next(iter(models.values())), ea)
        models[eager_name] = ea

        def call(m):
            def fn(inp):
                reset(m)
                return m(inp)
            return fn

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
        outputs = {}
        for name, m in models.items():
            f, params = call(m), list(m.parameters())
            r = {"fwd": fwd_times[name], "fwd_bwd": fwd_bwd_times[name]}
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
            with torch.no_grad():
                outputs[name], err = try_call(lambda f=f: f(x))
            r["error"] = r["error"] or err
            res[name] = r
        eager = res[eager_name]
        sp_out = outputs.get(f"spikeops {block}")
        for name, r in res.items():
            r["saved_over_eager"] = ratio(r.get("saved_mb"), eager.get("saved_mb"))
            r["saved_excl_params_over_eager"] = ratio(r.get("saved_mb_excl_params"), eager.get("saved_mb_excl_params"))
            r["eager_fwd_over"] = ratio(eager.get("fwd_ms"), r.get("fwd_ms"))
            r["eager_fwd_bwd_over"] = ratio(eager.get("fwd_bwd_ms"), r.get("fwd_bwd_ms"))
            other = outputs.get(name)
            r["mismatch_vs_spikeops"] = (None if sp_out is None or other is None or name == f"spikeops {block}"
                                         else mismatch(other, sp_out))
        out[block] = {"x_shape": list(MODULE_SHAPE), "dim": MODULE_DIM, "heads": MODULE_HEADS,
                      "p_kernel_size": p_ks, "same_weights": note is None, "copy_weights_error": note,
                      "results": res}
    return out


# ----------------------------------------------------------------------------- targets and printing

def targets(payload: dict, dev: torch.device) -> list[dict]:
    checks = []
    eager = EAGER_SJ if SJ_ERROR is None else EAGER_PY
    for shape, entry in payload["shapes"].items():
        if shape not in OP_SHAPES:
            continue
        for variant, v in entry["variants"].items():
            if dev.type == "cpu":
                checks.append((f"{shape} {variant}: {eager} fwd+bwd / spikeops fwd+bwd",
                               v["fwd_bwd"].get(eager, {}).get("over_spikeops"),
                               f">= {SPEEDUP_TARGET:g}", lambda x: x >= SPEEDUP_TARGET))
            checks.append((f"{shape} {variant}: fraction of spikes differing from {eager}",
                           v["fwd"].get(eager, {}).get("mismatch_vs_spikeops"), "0", lambda x: x == 0))
    return [{"check": c, "value": v, "target": t, "pass": None if v is None else ok(v)} for c, v, t, ok in checks]


def print_errors(rows: dict) -> None:
    notes = [f"* {n}: ERROR {r['error']}" for n, r in rows.items() if r.get("error")]
    if notes:
        print("\n" + "\n".join(notes))


def pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2%}"


def print_op(dev, name: str, entry: dict) -> None:
    T, B, Hh, N, d = entry["shape"]
    print(f"\n## token attention on {dev} | {name}: T={T} B={B} H={Hh} N={N} d={d} (C={Hh * d}) {entry['dtype']}, "
          f"memory layout {entry['layout']}, "
          f"spike density {DENSITY} | backend {entry['backend']} | {torch.get_num_threads()} threads | "
          f"malloc {entry['malloc']}")
    for variant, v in entry["variants"].items():
        fwd, fb = v["fwd"], v["fwd_bwd"]
        print(f"\n{variant} forward (no grad; attention LIF th {ATTN_TH}, tau {TAU:g}):\n")
        print(H.markdown_table(
            ["implementation", "fwd ms", "min ms", "/floor", "/spikeops", "spikes differ", "repeats"],
            [[n, H.fmt(r["ms"], 3), H.fmt(r["min_ms"], 3), H.fmt(r["over_floor"]), H.fmt(r["over_spikeops"]),
              pct(r.get("mismatch_vs_spikeops")), r["repeats"]] for n, r in fwd.items()]))
        print_errors(fwd)
        print(f"\n{variant} forward+backward (inputs require grad; random grad):\n")
        print(H.markdown_table(
            ["implementation", "fwd+bwd ms", "min ms", "/spikeops", "saved MB", "/spikeops", "grad max |diff|",
             "repeats"],
            [[n, H.fmt(r["ms"], 3), H.fmt(r["min_ms"], 3), H.fmt(r["over_spikeops"]), H.fmt(r["saved_mb"], 2),
              H.fmt(r["saved_over_spikeops"]),
              "-" if r["grad_max_abs_diff_vs_spikeops"] is None else f"{r['grad_max_abs_diff_vs_spikeops']:.1e}",
              r["repeats"]] for n, r in fb.items()]))
        print_errors(fb)


def print_modules(dev, entry: dict) -> None:
    for block, e in entry.items():
        T, B, C, N = e["x_shape"]
        print(f"\n## {block} module on {dev} | x [T={T}, B={B}, C={C}, N={N}] spikes, {e['heads']} heads, "
              f"p kernel {e['p_kernel_size'] or '-'}, train mode | same weights: {H.fmt(e['same_weights'])}\n")
        res = e["results"]
        print(H.markdown_table(
            ["block", "saved MB", "/eager", "saved MB excl. params", "/eager", "fwd ms", "eager/this",
             "fwd+bwd ms", "eager/this", "out spikes differ", "repeats"],
            [[n, H.fmt(r.get("saved_mb"), 2), H.fmt(r.get("saved_over_eager"), 3),
              H.fmt(r.get("saved_mb_excl_params"), 2), H.fmt(r.get("saved_excl_params_over_eager"), 3),
              H.fmt(r.get("fwd_ms")), H.fmt(r.get("eager_fwd_over")), H.fmt(r.get("fwd_bwd_ms")),
              H.fmt(r.get("eager_fwd_bwd_over")), pct(r.get("mismatch_vs_spikeops")),
              r.get("fwd", {}).get("repeats", "-")] for n, r in res.items()]))
        print_errors(res)
        if e["copy_weights_error"]:
            print(f"* weights not copied: {e['copy_weights_error']}")


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
    payload.update(benchmark="token_attention", dtype=args.dtype, repeats=args.repeats, warmup=args.warmup,
                   malloc=malloc, density=DENSITY,
                   attention=dict(v_threshold=ATTN_TH, tau=TAU, v_reset=0.0, decay_input=True, detach_reset=True,
                                  surrogate="sigmoid", alpha=ALPHA, mode="token"),
                   spikingjelly=sj_version(), spikingjelly_error=SJ_ERROR, shapes={})
    t_start = time.perf_counter()
    for name in names:
        if name in OP_SHAPES:
            gen = torch.Generator().manual_seed(0)
            T, B, Hh, N, d = OP_SHAPES[name]
            if name in CHANNELS_FIRST:
                q, k, p = (spikes((T, B, Hh, d, N), gen, dev, dtype).mT for _ in range(3))
            else:
                q, k, p = (spikes(OP_SHAPES[name], gen, dev, dtype) for _ in range(3))
            backend, _ = try_call(lambda: spikeops.backend.resolve(q, "auto"))
            entry = {"shape": list(OP_SHAPES[name]), "dtype": args.dtype, "malloc": malloc, "backend": backend,
                     "layout": "[T, B, H, d, N] (transposed views)" if name in CHANNELS_FIRST else "[T, B, H, N, d]",
                     "variants": {v: bench_op(q, k, p if with_p else None, args) for v, with_p in VARIANTS.items()}}
            print_op(dev, name, entry)
            del q, k, p
        else:
            entry = bench_modules(dev, dtype, args)
            print_modules(dev, entry)
        entry["other_cpu_busy_after"] = H.other_cpu_busy(0.25)  # others' load while we ran shows as noise
        payload["shapes"][name] = entry
    payload["targets"] = targets(payload, dev)
    payload["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    print_targets(payload["targets"])
    busy_after = {n: e["other_cpu_busy_after"] for n, e in payload["shapes"].items()}
    if any(b is not None and b > 0.2 for b in busy_after.values()):
        print(f"\nwarning: other processes were busy after some sections ({busy_after}); timings may be noisy"
              + (" - the eager rows most (many small multi-threaded ops; see the module docstring)"
                 if dev.type == "cpu" and torch.get_num_threads() > 1 else ""))
    path = H.write_json(f"token_attention_{dev.type}", payload)
    print(f"\nwrote {path} ({payload['elapsed_s']} s)")
    return payload


def run(args: argparse.Namespace) -> None:
    """Benchmark every selected section on every selected device (flags: harness.add_common_args)."""
    names = select(args.shapes, standalone=not hasattr(args, "only"))
    if not names:
        print(f"bench_token_attention: no token attention sections for --shapes {args.shapes} "
              f"(have {list(SECTIONS)}); skipped")
        return
    args.malloc_policy = getattr(args, "malloc_policy", None) or H.configure_malloc(args.malloc)
    if SJ_ERROR:
        print(f"SpikingJelly not importable ({SJ_ERROR}): SpikingJelly rows skipped, eager blocks use a python LIF")
    for dev in H.devices(args.device):
        run_device(dev, names, args)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.bench_token_attention", description=__doc__.splitlines()[0])
    run(H.add_common_args(parser).parse_args(argv))


if __name__ == "__main__":
    main()
