r"""Energy accounting for spiking networks: ``spikeops.energy.profile``.

What papers on spiking transformers report as "Power" (see the "Energy accounting" notes of the
project): multiply-accumulates (MACs) on real-valued inputs cost :math:`E_{MAC}` each and
synaptic operations (SOPs, accumulates triggered by spikes) cost :math:`E_{AC}` each,

.. math::

    E = E_{MAC} \cdot \mathrm{FLOPs}_{MAC} + E_{AC} \cdot \sum \mathrm{SOP},
    \qquad E_{MAC} = 4.6\,\mathrm{pJ},\; E_{AC} = 0.9\,\mathrm{pJ} \text{ (45 nm)}.

:func:`profile` runs the model once on ``x`` (under ``torch.no_grad``, in whatever train/eval
mode the model is in) and counts, through forward hooks, what every layer actually computed on
that input. Time is folded into the batch (inputs ``[T*B, ...]`` or ``[T, B, ...]``), so every
count below covers all T steps and the whole batch; the ``× T`` of the papers' formula
``SOP = rate × T × FLOPs`` is already inside FLOPs here.

Counted modules and rules
-------------------------
**Conv and Linear layers.** Every ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``/``nn.Linear``,
subclasses included (:class:`spikeops.nn.SpikeLinear`, :class:`~spikeops.nn.SpikeConv1d`,
:class:`~spikeops.nn.SpikeConv2d`, :class:`~spikeops.nn.MaskedConv2d`, ...), whatever its name.

* ``FLOPs`` (dense multiply-accumulates, bias additions not counted):
  Linear on ``[*, C_in]`` -> ``[*, C_out]``: ``numel(output) * C_in``;
  conv ``[N, C_in, *S]`` -> ``[N, C_out, *S_out]``: ``numel(output) * C_in/groups * prod(kernel)``
  (padded taps included, the usual convention).
* Each call's input ``x`` is classified:

  - **binary** (only 0/1) and **integer counts** (only integers ``0..max_count``, e.g. the
    residual sums 0, 1, 2, 3 of Spikformer blocks): accumulates, ``op = "AC"``. An input
    element of value ``n`` is ``n`` spikes, each one accumulate into every output it feeds
    (its fan-out), so

    .. math:: \mathrm{SOP} = \sum_i x_i \cdot \mathrm{fanout}_i

    computed exactly: Linear ``sum(x) * C_out``; conv ``sum(conv(x, 1)) * C_out/groups`` with
    an all-ones kernel and the layer's stride, padding, dilation, groups and padding mode, so an
    input pixel near a border counts only the outputs it really feeds. For 0/1 input this is
    exactly ``firing_rate(x) * FLOPs`` when every input element feeds the same number of outputs
    (Linear, 1x1 convs, patch convs with stride = kernel tiling the input); otherwise each spike
    counts its own fan-out (a corner pixel of a 3x3 conv feeds fewer outputs than a central
    one), and with zero padding the count is smaller on average (padded taps never spike).
  - **real** (anything else: non-integer, negative, non-finite, or integers above
    ``max_count`` such as raw 0..255 pixels): multiply-accumulates, ``op = "MAC"``,
    counted as ``FLOPs``.

  The row's ``rate`` is the mean input value over its AC calls (the firing rate for 0/1 input,
  spikes per element for counts); ``None`` when every call was real-valued.
* :class:`spikeops.nn.MaskedConv2d` inside :func:`spikeops.nn.masking` computes only the visible
  output blocks: FLOPs count the visible outputs only and SOPs only the accumulates into them.

**Spiking Self-Attention** (:class:`spikeops.nn.SpikingSelfAttention`; its q/k/v/proj Linears are
counted as above). The spike products ``Q K^T V`` per block, in ``K^T V`` order
(``spikeops.ssa`` may evaluate them in the other order; the count does not follow it):

.. math::

    \mathrm{SOP} = T B h N d^2 \, (\min(f_k, f_v) + f_q)
                 = d \, (\textstyle\sum Q + \min(\sum K, \sum V))

with ``f_q, f_k, f_v`` the firing rates of the Q/K/V spikes (the outputs of the ``q``, ``k``, ``v``
submodules, ``[T, B, N, C]``, ``C = h d``) over the whole block: ``K^T V`` (``d x N`` by
``N x d``) is non-zero only where both spike, at most ``min(f_k, f_v)`` of its ``N d^2``
products, and ``Q (K^T V)`` accumulates a ``d``-vector per Q spike. ``FLOPs = 2 T B h N d^2``
(the two dense products). The ``scale`` multiply is folded into the attention neuron's
threshold and not counted.

**Token attention** (:class:`spikeops.nn.QKTokenAttention`, :class:`spikeops.nn.MultiScaleSpikingAttention`;
their q/k/p/proj convs are counted as above). Same rule as the layers: each spike is one
accumulate per output it feeds.

* Column sums ``S = sum_c Q (+ sum_c P)`` over the head's channels: each Q (P) spike is one
  addition into its token's count: ``SOP = sum Q (+ sum P) = T B N C (f_q + f_p)``.
* Mask ``out = A * K``: each spike of the attention neuron ``A`` (``[T, B, h, N]``) gates the
  ``d`` channels of K of its token and head: ``SOP = d * sum A = T B N C f_attn`` with
  ``f_attn`` the firing rate of ``A``. This counts one operation per gated channel whether or
  not K spikes there (an upper bound: on 0/1 spikes the gating is an AND).

  ``A`` is recomputed exactly from the observed Q (and P) spikes with the block's attention
  neuron (:func:`spikeops.reference.lif`, ``attn_v_threshold``, ``tau``).
* ``FLOPs = T B N C`` per summed tensor plus ``T B N C`` for the mask.

Energy: ``mac_mj = FLOPs_MAC * e_mac * 1e3``, ``ac_mj = SOPs * e_ac * 1e3`` (joules to mJ),
``total_mj`` their sum.

Model state: parameters are untouched (no_grad); every buffer (BatchNorm running statistics,
``num_batches_tracked``, ...) and SpikingJelly neuron memories (``_memories``) are snapshotted
before the run and restored after it, also when the forward raises; the hooks are always removed.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from spikeops import reference
from spikeops.nn.attention import SpikingSelfAttention
from spikeops.nn.masked import MaskedConv2d, current_mask
from spikeops.nn.token_attention import MultiScaleSpikingAttention, QKTokenAttention

__all__ = ["profile", "EnergyReport", "LayerEnergy", "E_MAC", "E_AC", "MAX_COUNT"]

E_MAC = 4.6e-12  # J per multiply-accumulate (45 nm)
E_AC = 0.9e-12   # J per accumulate (45 nm)
MAX_COUNT = 64   # largest integer input value still counted as spikes (AC)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_TOKEN_ATTENTION = (QKTokenAttention, MultiScaleSpikingAttention)


@dataclass
class LayerEnergy:
    """One row of an :class:`EnergyReport` (one module, summed over its calls).

    Attributes:
        name: the module's name in ``model.named_modules()`` (``"(model)"`` for the model itself).
        kind: the module's class name.
        op: ``"MAC"``, ``"AC"`` or ``"MAC+AC"`` (calls of both kinds).
        input: what the input was: ``"real"``, ``"binary"``, ``"int 0..M"`` (largest value M),
            ``"spikes"`` for the attention products; joined with ``"+"`` when calls differ.
        rate: mean input value over the AC calls (the firing rate for 0/1 spikes); None if none.
        flops: dense multiply-accumulates of every call (see the module doc).
        flops_mac: the part of ``flops`` counted as MACs (real-valued inputs).
        sops: synaptic operations (accumulates) of the AC calls.
        calls: how many times the module ran.
        energy_mj: ``flops_mac * e_mac + sops * e_ac``, in mJ.
        rates: the attention rows' firing rates (``f_q``, ``f_k``, ``f_v``, ``f_p``, ``f_attn``).
    """

    name: str
    kind: str
    op: str
    input: str
    rate: Optional[float]
    flops: int
    flops_mac: int
    sops: int
    calls: int
    energy_mj: float
    rates: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "op": self.op, "input": self.input, "rate": self.rate,
                "flops": self.flops, "flops_mac": self.flops_mac, "sops": self.sops, "calls": self.calls,
                "energy_mj": self.energy_mj, "rates": dict(self.rates)}


@dataclass
class EnergyReport:
    """What :func:`profile` returns: per-layer rows (module order) and totals.

    ``str(report)`` / :meth:`table` is an aligned text table, :meth:`to_dict` a JSON-able dict.
    Totals: ``flops_mac`` (MACs on real-valued inputs), ``sops`` (accumulates), ``flops`` (dense
    count of every row), ``mac_mj = flops_mac * e_mac``, ``ac_mj = sops * e_ac``, ``total_mj``
    (energies in mJ; ``e_mac``/``e_ac`` in J).
    """

    rows: List[LayerEnergy]
    e_mac: float = E_MAC
    e_ac: float = E_AC

    @property
    def flops_mac(self) -> int:
        return sum(r.flops_mac for r in self.rows)

    @property
    def sops(self) -> int:
        return sum(r.sops for r in self.rows)

    @property
    def flops(self) -> int:
        return sum(r.flops for r in self.rows)

    @property
    def mac_mj(self) -> float:
        return self.flops_mac * self.e_mac * 1e3

    @property
    def ac_mj(self) -> float:
        return self.sops * self.e_ac * 1e3

    @property
    def total_mj(self) -> float:
        return self.mac_mj + self.ac_mj

    def row(self, name: str) -> LayerEnergy:
        """The row of the module called ``name`` (KeyError if it did not run)."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row for module {name!r}; rows: {[r.name for r in self.rows]}")

    def to_dict(self) -> dict:
        return {"e_mac_j": self.e_mac, "e_ac_j": self.e_ac, "rows": [r.to_dict() for r in self.rows],
                "totals": {"flops": self.flops, "flops_mac": self.flops_mac, "sops": self.sops,
                           "mac_mj": self.mac_mj, "ac_mj": self.ac_mj, "total_mj": self.total_mj}}

    def table(self) -> str:
        header = ["layer", "kind", "op", "input", "rate", "FLOPs", "SOPs", "mJ", "detail"]
        right = {"rate", "FLOPs", "SOPs", "mJ"}
        body = [[r.name, r.kind, r.op, r.input, "-" if r.rate is None else f"{r.rate:.4f}", f"{r.flops:,}",
                 f"{r.sops:,}", f"{r.energy_mj:.4g}",
                 " ".join(f"{k}={v:.4f}" for k, v in r.rates.items()) + (f" calls={r.calls}" if r.calls > 1 else "")]
                for r in self.rows]
        widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

        def fmt(line):
            return "  ".join(c.rjust(w) if h in right else c.ljust(w)
                             for c, w, h in zip(line, widths, header)).rstrip()

        lines = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in body]
        lines += ["",
                  f"MAC: {self.flops_mac:,} FLOPs x {self.e_mac * 1e12:g} pJ = {self.mac_mj:.6g} mJ",
                  f"AC:  {self.sops:,} SOPs x {self.e_ac * 1e12:g} pJ = {self.ac_mj:.6g} mJ",
                  f"total: {self.total_mj:.6g} mJ"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


class _Row:
    """Counts of one module accumulated over its calls."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.kind = name or "(model)", type(module).__name__
        self.calls = self.flops = self.flops_mac = self.sops = 0
        self.ops, self.inputs = [], []
        self.in_sum, self.in_numel = 0.0, 0
        self.sums: Dict[str, float] = {}
        self.numels: Dict[str, int] = {}

    def add(self, op: str, input_kind: str, flops: int, sops: int = 0):
        self.calls += 1
        self.flops += flops
        if op == "MAC":
            self.flops_mac += flops
        self.sops += sops
        if op not in self.ops:
            self.ops.append(op)
        if input_kind not in self.inputs:
            self.inputs.append(input_kind)

    def add_rate(self, key: str, total: float, numel: int):
        self.sums[key] = self.sums.get(key, 0.0) + total
        self.numels[key] = self.numels.get(key, 0) + numel

    def result(self, e_mac: float, e_ac: float) -> LayerEnergy:
        rates = {k: self.sums[k] / self.numels[k] if self.numels[k] else 0.0 for k in self.sums}
        return LayerEnergy(
            name=self.name, kind=self.kind, op="+".join(sorted(self.ops, reverse=True)), input="+".join(self.inputs),
            rate=self.in_sum / self.in_numel if self.in_numel else None, flops=int(self.flops),
            flops_mac=int(self.flops_mac), sops=int(self.sops), calls=self.calls,
            energy_mj=(self.flops_mac * e_mac + self.sops * e_ac) * 1e3, rates=rates)


def _classify(x: torch.Tensor, max_count: int):
    """(``"binary"`` | ``"int 0..M"`` | ``"real"``, x as fp32/fp64 for counting)."""
    xf = x if x.is_floating_point() else x.to(torch.float32)
    if xf.dtype not in (torch.float32, torch.float64):
        xf = xf.to(torch.float32)  # fp16/bf16: count in fp32 (integers exact)
    if xf.numel() == 0:
        return "binary", xf
    lo, hi = float(xf.min()), float(xf.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi > max_count or bool((xf != xf.round()).any()):
        return "real", xf
    return ("binary" if hi <= 1 else f"int 0..{int(hi)}"), xf


def _first_input(args, kwargs, where: str) -> torch.Tensor:
    x = args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"spikeops.energy.profile: {where} was called with a {type(x).__name__} input; "
                        "only tensor inputs can be counted")
    return x


def _conv_counts(m: nn.modules.conv._ConvNd, x: torch.Tensor, y, ac: bool):
    """(FLOPs, SOPs) of conv ``m`` on input ``x`` (x already float); SOPs only when ``ac``."""
    nd = len(m.kernel_size)
    masked = isinstance(m, MaskedConv2d) and current_mask() is not None
    if masked and x.dim() == 5:
        x = x.flatten(0, 1)
    if x.dim() == nd + 1:
        x = x.unsqueeze(0)
    per_output = (m.in_channels // m.groups) * math.prod(m.kernel_size)
    ones_out = None
    if ac or masked or not isinstance(y, torch.Tensor):
        # conv(x, 1): for each output position and group, the sum of the inputs it reads
        w = torch.ones((m.groups, m.in_channels // m.groups, *m.kernel_size), dtype=x.dtype, device=x.device)
        xp, padding = x, m.padding
        if m.padding_mode != "zeros":
            xp, padding = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode), 0
        ones_out = _CONV_FNS[nd](xp, w, None, m.stride, padding, m.dilation, m.groups)
    if masked:
        visible = reference.upsample_mask(current_mask(), ones_out.shape[0], ones_out.shape[-2:]).to(x.dtype)
        flops = int(visible.sum(dtype=torch.float64)) * m.out_channels * per_output
        sops = (ones_out * visible).sum(dtype=torch.float64) if ac else 0
    else:
        out_numel = y.numel() if isinstance(y, torch.Tensor) else ones_out.numel() // m.groups * m.out_channels
        flops = out_numel * per_output
        sops = ones_out.sum(dtype=torch.float64) if ac else 0
    return flops, (int(round(float(sops))) * (m.out_channels // m.groups) if ac else 0)


def _layer_hook(row: _Row, max_count: int):
    def hook(m, args, kwargs, y):
        x = _first_input(args, kwargs, f"{row.name} ({row.kind})")
        input_kind, xf = _classify(x, max_count)
        ac = input_kind != "real"
        if isinstance(m, nn.Linear):
            flops = (xf.numel() // m.in_features) * m.in_features * m.out_features
            sops = int(round(float(xf.sum(dtype=torch.float64)))) * m.out_features if ac else 0
        else:
            flops, sops = _conv_counts(m, xf, y, ac)
        row.add("AC" if ac else "MAC", input_kind, flops, sops)
        if ac:
            row.in_sum += float(xf.sum(dtype=torch.float64))
            row.in_numel += xf.numel()
    return hook


def _spike_stats(t: torch.Tensor):
    return float(t.sum(dtype=torch.float64)), t.numel()


def _ssa_hooks(row: _Row, m: SpikingSelfAttention):
    seen = {}

    def branch(key):
        def hook(_, __, out):
            seen[key] = _spike_stats(out)
            seen[key + "_shape"] = out.shape
        return hook

    def pre(*_):
        seen.clear()

    def done(*_):
        if not all(k in seen for k in ("q", "k", "v")):
            raise RuntimeError(f"spikeops.energy.profile: {row.name} ran without calling its q, k and v submodules")
        T, B, N, C = seen["q_shape"]
        d = C // m.num_heads
        (sq, nq), (sk, nk), (sv, nv) = seen["q"], seen["k"], seen["v"]
        sops = d * (sq + min(sk, sv))  # T B h N d^2 (min(f_k, f_v) + f_q)
        row.add("AC", "spikes", 2 * T * B * N * C * d, int(round(sops)))
        for key, s, n in (("f_q", sq, nq), ("f_k", sk, nk), ("f_v", sv, nv)):
            row.add_rate(key, s, n)

    return [m.register_forward_pre_hook(pre), m.register_forward_hook(done),
            m.q.register_forward_hook(branch("q")), m.k.register_forward_hook(branch("k")),
            m.v.register_forward_hook(branch("v"))]


def _token_attention_hooks(row: _Row, m):
    seen = {}

    def branch(key):
        def hook(_, __, out):  # out: spikes [T, B, C, N] -> per-head counts [T, B, h, N]
            T, B, C, N = out.shape
            seen[key] = _spike_stats(out)
            seen[key + "_count"] = out.reshape(T, B, m.num_heads, C // m.num_heads, N).sum(3, dtype=torch.float32)
        return hook

    def pre(*_):
        seen.clear()

    def done(*_):
        if "q" not in seen or (m.p is not None and "p" not in seen):
            raise RuntimeError(f"spikeops.energy.profile: {row.name} ran without calling its q (and p) submodules")
        s = seen["q_count"] + seen["p_count"] if m.p is not None else seen["q_count"]
        a = reference.lif(s, tau=m.tau, v_threshold=m.attn_v_threshold, v_reset=0.0, decay_input=True,
                          detach_reset=True)
        sa, na = _spike_stats(a)
        d = m.dim // m.num_heads
        summed = ["q", "p"] if m.p is not None else ["q"]
        sops = sum(seen[k][0] for k in summed) + d * sa
        numel = seen["q"][1]  # T B C N
        row.add("AC", "spikes", numel * (len(summed) + 1), int(round(sops)))
        for k in summed:
            row.add_rate("f_" + k, *seen[k])
        row.add_rate("f_attn", sa, na)

    hooks = [m.register_forward_pre_hook(pre), m.register_forward_hook(done), m.q.register_forward_hook(branch("q"))]
    if m.p is not None:
        hooks.append(m.p.register_forward_hook(branch("p")))
    return hooks


def _check_energy(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"spikeops.energy.profile: {name} must be a number of joules (e.g. 4.6e-12), "
                        f"got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"spikeops.energy.profile: {name} must be a finite energy >= 0 in joules, got {value}")
    return float(value)


def profile(model: nn.Module, x: torch.Tensor, e_mac: float = E_MAC, e_ac: float = E_AC, *,
            max_count: int = MAX_COUNT) -> EnergyReport:
    """Run ``model(x)`` once under ``torch.no_grad`` and count its MACs, SOPs and energy.

    Args:
        model: any ``nn.Module``; it runs in its current train/eval mode (call ``model.eval()``
            for inference numbers). Its buffers (BatchNorm statistics, ...) are restored after.
        x: the model's input tensor, time folded into the batch or leading (e.g. images
            ``[B, C, H, W]``, frames ``[T, B, C, H, W]``, tokens ``[T, B, N, C]``).
        e_mac: joules per multiply-accumulate on real-valued input (default 4.6 pJ).
        e_ac: joules per accumulate / synaptic operation (default 0.9 pJ).
        max_count: integer inputs ``0..max_count`` count as spikes (AC); larger ones as real
            values (MAC), so raw 0..255 pixels are MACs.

    Returns:
        :class:`EnergyReport`: one row per counted module that ran, in ``named_modules()`` order,
        and the totals ``flops_mac``, ``sops``, ``mac_mj``, ``ac_mj``, ``total_mj``. The rules
        are in the module docstring.

    Raises:
        TypeError: model is not an ``nn.Module``, x is not a tensor, an energy is not a number.
        ValueError: an energy is negative or not finite, ``max_count < 1``, or the model has no
            Conv/Linear/attention module to count.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"spikeops.energy.profile: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError("spikeops.energy.profile: x must be a torch.Tensor (the model's input, e.g. "
                        f"[T, B, C, H, W] or [T*B, C, H, W]), got {type(x).__name__}")
    e_mac, e_ac = _check_energy(e_mac, "e_mac"), _check_energy(e_ac, "e_ac")
    if isinstance(max_count, bool) or not isinstance(max_count, numbers.Integral) or max_count < 1:
        raise ValueError(f"spikeops.energy.profile: max_count must be an integer >= 1, got {max_count!r}")

    rows, hooks = [], []
    for name, m in model.named_modules():
        if isinstance(m, SpikingSelfAttention):
            rows.append(_Row(name, m))
            hooks += _ssa_hooks(rows[-1], m)
        elif isinstance(m, _TOKEN_ATTENTION):
            rows.append(_Row(name, m))
            hooks += _token_attention_hooks(rows[-1], m)
        elif isinstance(m, _CONVS + (nn.Linear,)):
            rows.append(_Row(name, m))
            hooks.append(m.register_forward_hook(_layer_hook(rows[-1], int(max_count)), with_kwargs=True))
    if not rows:
        raise ValueError(f"spikeops.energy.profile: {type(model).__name__} has no nn.Conv1d/2d/3d, nn.Linear, "
                         "SpikingSelfAttention or token-attention module to count")

    buffers = [(mod, key, buf, buf.detach().clone()) for mod in model.modules()
               for key, buf in mod._buffers.items() if buf is not None]
    memories = [(mod, {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in mod._memories.items()})
                for mod in model.modules() if isinstance(getattr(mod, "_memories", None), dict)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for mod, key, buf, saved in buffers:
                buf.copy_(saved)
                mod._buffers[key] = buf
        for mod, saved in memories:
            mod._memories.clear()
            mod._memories.update(saved)
    return EnergyReport([r.result(e_mac, e_ac) for r in rows if r.calls], e_mac, e_ac)
