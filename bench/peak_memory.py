"""Peak of live tensor bytes in one training step, on any device: ``python -m bench.peak_memory
[--case v2_512] [--batch 1] [--builds spikeops,torch]``.

A ``TorchDispatchMode`` counts every storage an op creates until it is freed, through the forward
and backward of ``cross_entropy(model(x), y)`` (no optimizer step), and reports the peak (parameters
and their gradients excluded: they exist before the step) with the op it happened at and the largest
tensors alive then. Device-independent: it sees tensors, not allocators, so it misses library
workspaces (cuDNN, cuBLAS) and allocator caching; on CUDA, ``bench.bench_train_step`` reports
``torch.cuda.max_memory_allocated``. A diagnosis tool for where a step's memory peak comes from.
"""
from __future__ import annotations

import argparse
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bench import bench_train_step as ts


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under it that are still alive; the peak and what was alive then."""

    def __init__(self, top: int = 12):
        super().__init__()
        self.live: dict[int, tuple] = {}
        self.current = self.peak = 0
        self.phase, self.top, self.peak_op, self.peak_live = "forward", top, None, []

    def _freed(self, key: int, nbytes: int) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.live:
                    self.live[key] = (nbytes, str(func.overloadpacket), self.phase, tuple(t.shape), t.dtype)
                    self.current += nbytes
                    weakref.finalize(storage, self._freed, key, nbytes)
        if self.current > self.peak:
            self.peak, self.peak_op = self.current, (str(func.overloadpacket), self.phase)
            self.peak_live = sorted(self.live.values(), key=lambda v: -v[0])[:self.top]
        return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="v2_512", choices=sorted(ts.CASES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--builds", default="spikeops,torch")
    parser.add_argument("--top", type=int, default=8, help="largest live tensors listed at the peak")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    case = {**ts.CASES[args.case], "batch": {dev.type: args.batch}}
    models = ts.builds(case, dev)
    x, y = ts.random_batch(case, args.batch, models["spikeops"], dev)
    print(f"## {case['model']} b{args.batch} {case['img']}px on {dev}: peak live tensor MB in forward + backward "
          f"(parameters and their gradients excluded)")
    peaks = {}
    for name in args.builds.split(","):
        model = models[name]
        with LiveBytes(args.top) as mem:
            loss = F.cross_entropy(model(x), y)
            mem.phase = "backward"
            loss.backward()
        if ts.eager.sj_functional is not None:
            ts.eager.sj_functional.reset_net(model)
        peaks[name] = mem.peak
        print(f"\n{name}: {mem.peak / 1e6:.1f} MB, at {mem.peak_op[0]} ({mem.peak_op[1]}); largest tensors alive then:")
        for nbytes, op, phase, shape, dtype in mem.peak_live:
            print(f"  {nbytes / 1e6:8.1f} MB  {op} ({phase}) {list(shape)} {str(dtype).replace('torch.', '')}")
    if "torch" in peaks:
        print("\n" + ", ".join(f"{n} / torch {p / peaks['torch']:.2f}" for n, p in peaks.items() if n != "torch"))


if __name__ == "__main__":
    main()
