"""End-to-end inference: a model's forward in eval mode under ``torch.inference_mode()``.

The three builds of :mod:`bench.bench_train_step` (same weights and BatchNorm statistics): ``spikeops`` (its kernels: the
multi-step LIF, the fused SSA / token attention; BatchNorm, Linear and conv are torch's), ``torch``
(``backend="torch"``: eager PyTorch) and ``spikingjelly`` (the torch build with SpikingJelly 2.0
``LIFNode``s). Reported per build: median (and min) ms per batch of round-robin timed calls,
images/s, the speed-up against ``torch`` and ``spikingjelly``, and the largest difference of its
logits from the ``torch`` build's (0 when every spike matched). Same cases and batch sizes as the
training step (``--shapes cifar,v2``; ``v2_512`` on CUDA). ``--amp bf16|fp16`` runs under autocast; run by
``bench.run``, fp32 and, on a CPU with AMX tiles, bf16 autocast too.

A freshly initialised model in eval mode is silent (BatchNorm's running statistics are still 0 / 1,
so almost no neuron reaches threshold), which would time a network without spikes. The running
statistics are therefore first calibrated: cumulative averages over a few training-mode forward
passes on random batches, without gradients. The table reports the resulting mean firing rate of
the layers' spike inputs.
Results: a markdown table and ``bench/results/inference_<device>[_<amp>].json``.
"""
from __future__ import annotations

import torch

import spikeops.nn as snn
from bench import bench_train_step as ts
from bench import eager
from bench import harness as H


def forward(model, x, dtype):
    """Logits for ``x`` (SpikingJelly neurons reset after the call, as between batches)."""
    with torch.inference_mode(), ts.autocast(x.device.type, dtype):
        out = model(x)
    if eager.sj_functional is not None:
        eager.sj_functional.reset_net(model)
    return out


def calibrate(model, case: dict, batch: int, dev: torch.device, passes: int = 3) -> None:
    """Set every BatchNorm's running statistics to the cumulative average over ``passes``
    training-mode forward passes on random batches (no gradients)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    gen = torch.Generator().manual_seed(2)
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            forward(model, torch.rand(batch, 3, case["img"], case["img"], generator=gen).to(dev), None)
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
    model.eval()


def firing_rate(model, x) -> float:
    """Mean fraction of nonzero inputs over the layers fed with spikes (Spike* layers)."""
    counts = [0, 0]

    def hook(module, inputs, output):
        counts[0] += int(torch.count_nonzero(inputs[0]))
        counts[1] += inputs[0].numel()
    spike_layers = (snn.SpikeLinear, snn.SpikeConv1d, snn.SpikeConv2d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, spike_layers)]
    forward(model, x, None)
    for h in handles:
        h.remove()
    return counts[0] / max(counts[1], 1)


def bench_case(key: str, dev: torch.device, args, amp: str) -> dict:
    case = ts.CASES[key]
    batch = case["batch"][dev.type]
    dtype = ts.AMP_DTYPES[amp]
    models = ts.builds(case, dev)
    calibrate(models["spikeops"], case, batch, dev)
    for m in models.values():
        m.load_state_dict(models["spikeops"].state_dict())
        m.eval()
    x, _ = ts.random_batch(case, batch, models["spikeops"], dev)
    rate = firing_rate(models["spikeops"], x)
    calls = {n: (lambda m=m: forward(m, x, dtype)) for n, m in models.items()}
    reps = max(3, args.repeats // 2)
    times = H.time_interleaved(calls, {n: reps for n in calls}, max(1, args.warmup), dev)
    reference = forward(models["torch"], x, dtype).float()
    rows = {}
    for n, t in times.items():
        if isinstance(t, Exception):
            rows[n] = {"error": f"{type(t).__name__}: {t}"}
            continue
        diff = (forward(models[n], x, dtype).float() - reference).abs().max().item()
        rows[n] = {"batch_ms": H.median(t), "times_ms": t, "images_per_s": batch / H.median(t) * 1e3,
                   "max_logit_diff_vs_torch": diff}
    for r in rows.values():
        for base in ("torch", "spikingjelly"):
            if "batch_ms" in r and "batch_ms" in rows.get(base, {}):
                r[f"speedup_vs_{base}"] = rows[base]["batch_ms"] / r["batch_ms"]
    return {"model": case["model"], "overrides": case["overrides"], "batch": batch, "T": models["spikeops"].T,
            "img": case["img"], "amp": amp, "firing_rate": rate, "builds": rows}


def table(results: dict) -> str:
    head = ["case", "build", "ms / batch", "min ms", "images/s", "x vs torch", "x vs SJ", "max |logit diff|"]
    rows = []
    for res in results.values():
        amp = "" if res["amp"] == "off" else f" {res['amp']}"
        label = f"{res['model']} b{res['batch']} T{res['T']} {res['img']}px{amp}, rate {res['firing_rate']:.3f}"
        for n, r in res["builds"].items():
            if "error" in r:
                rows.append([label, n, r["error"][:60]] + ["-"] * 5)
                continue
            rows.append([label, n, H.fmt(r["batch_ms"], 1), H.fmt(min(r["times_ms"]), 1), H.fmt(r["images_per_s"], 1),
                         H.fmt(r.get("speedup_vs_torch")), H.fmt(r.get("speedup_vs_spikingjelly")),
                         f"{r['max_logit_diff_vs_torch']:.2g}"])
    return H.markdown_table(head, rows)


def run(args) -> None:
    H.configure_malloc(args.malloc)
    for dev in H.devices(args.device):
        for amp in ts.amps_of(args, dev):
            results = {}
            for key in ts.wanted_cases(dev, args.shapes):
                print(f"  {key}: {ts.CASES[key]['model']} inference on {dev}{'' if amp == 'off' else ', ' + amp} ...",
                      flush=True)
                results[key] = bench_case(key, dev, args, amp)
            if results:
                print(table(results))
                payload = {**H.run_header(dev), "amp": amp, "results": results}
                print(f"  wrote {H.write_json(ts.result_name('inference', dev, amp), payload)}")


if __name__ == "__main__":
    ts.main(__doc__, run)
