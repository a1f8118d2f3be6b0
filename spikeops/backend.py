"""The one place that picks an implementation for an op.

Every op in spikeops has up to three implementations that must agree:

========  ==========================================  =====================================
backend   what runs                                    when ``backend="auto"`` picks it
========  ==========================================  =====================================
torch     :mod:`spikeops.reference` (plain PyTorch,   float64 inputs; devices or ops with no
          autograd through the loop; ground truth)     kernel; a missing build; on CUDA,
                                                       the ops in ``TORCH_ON_CUDA``
cpp       C++ kernels in ``spikeops._C`` (OpenMP,      CPU tensors (fp32 / fp16 / bf16)
          SIMD picked at run time)
triton    Triton kernels in :mod:`spikeops.triton`     CUDA tensors (fp32 / fp16 / bf16)
========  ==========================================  =====================================

``TRITON_INTERPRET=1`` (read once, at import, as Triton itself does) lets the Triton kernels
run on CPU tensors through Triton's interpreter; the test suite uses it on small shapes.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "cpp", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

try:
    from spikeops import _C as _cpp
except ImportError as _exc:  # the package imports without a build; "auto" then uses torch
    _cpp = None
    _CPP_IMPORT_ERROR = str(_exc)
else:
    _CPP_IMPORT_ERROR = ""


def cpp_available() -> bool:
    """True when the C++ extension ``spikeops._C`` is built and importable."""
    return _cpp is not None


def triton_available(device: torch.device) -> bool:
    """True when Triton can run kernels on tensors of ``device`` (CUDA, or CPU under the interpreter)."""
    if not TRITON_INSTALLED:
        return False
    return device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRET)


# Ops whose Triton kernels are slower on CUDA than the torch path they would replace, measured
# (BENCHMARKS.md, "GPU"): ``backend="auto"`` runs torch's path for them on CUDA tensors, and
# ``backend="triton"`` still runs the kernels. masked_conv2d: the implicit-GEMM kernels over the
# visible pixels took 2.8x the time of cuDNN's dense convolution followed by the mask
# (fwd+bwd, 12 SCS stem layers, batch 8, mask ratio 0.75, H100, TF32 on both); masked_batch_norm2d:
# the Triton block gather/scatter around torch's BatchNorm took 1.3x the time of the reference's
# boolean-index gather (5 stem shapes, batch 8, mask ratio 0.75, H100).
TORCH_ON_CUDA = frozenset({"masked_conv2d", "masked_batch_norm2d"})


def resolve(tensor: torch.Tensor, backend: str = "auto", op: str = "") -> str:
    """Return the backend (``"cpp"``, ``"triton"`` or ``"torch"``) that runs an op on ``tensor``.
    ``op`` names the op for the ops in ``TORCH_ON_CUDA``, which ``"auto"`` runs with torch on CUDA.

    Raises ``ValueError`` for an unknown backend or one that cannot run on ``tensor``'s device,
    ``TypeError`` for a dtype the forced backend has no kernel for, ``RuntimeError`` when the
    forced backend is not installed/built.
    """
    return resolve_for(tensor.device, tensor.dtype, backend, op)


def resolve_for(device: torch.device, dtype: torch.dtype, backend: str = "auto", op: str = "") -> str:
    """:func:`resolve` for a tensor of ``dtype`` on ``device`` (for an op whose output dtype is
    not its input's, e.g. unpacking int64 words to floats)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if dtype not in KERNEL_DTYPES:
            return "torch"
        if device.type == "cuda":
            return "triton" if TRITON_INSTALLED and op not in TORCH_ON_CUDA else "torch"
        if device.type == "cpu":
            return "cpp" if cpp_available() else "torch"
        return "torch"
    if backend == "torch":
        return backend
    if dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"backend={backend!r} has kernels for float32, float16 and bfloat16, got {dtype}; "
            "use backend='torch' (or 'auto') for float64"
        )
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(
                f"backend='cpp' runs on CPU tensors, got a tensor on {device}; "
                "use backend='auto' or 'triton' for CUDA tensors"
            )
        if not cpp_available():
            raise RuntimeError(
                "backend='cpp' needs the C++ extension spikeops._C, which is not built "
                f"({_CPP_IMPORT_ERROR}); run `make setup` or `pip install -e . --no-build-isolation`"
            )
        return backend
    # backend == "triton"
    if not TRITON_INSTALLED:
        raise RuntimeError("backend='triton' needs the triton package: pip install 'triton>=3.2'")
    if not triton_available(device):
        raise ValueError(
            f"backend='triton' runs on CUDA tensors, got a tensor on {device}; move it to a GPU, "
            "or set TRITON_INTERPRET=1 before importing spikeops to run Triton's interpreter on CPU"
        )
    return backend


@torch.compiler.assume_constant_result  # torch.compile asks once while tracing (no import_module in the graph)
def has_kernel(op: str, fn: str, backend: str) -> bool:
    """True when ``backend`` has the raw kernel ``fn`` of ``op`` (see :func:`kernel`); ops use it
    for kernels that only some backends have, falling back to a composite of the others."""
    if backend == "cpp":
        return hasattr(_cpp, fn)
    if backend == "triton":  # ops with C++ kernels only have no module there
        return (importlib.util.find_spec(f"spikeops.triton.{op}") is not None
                and hasattr(importlib.import_module(f"spikeops.triton.{op}"), fn))
    return False


def kernel(op: str, fn: str, backend: str):
    """The raw kernel ``fn`` of ``op`` on ``backend``: ``spikeops._C.<fn>`` (C++) or
    ``spikeops.triton.<op>.<fn>`` (Triton). Both backends use the same names and arguments."""
    if backend == "cpp":
        return getattr(_cpp, fn)
    if backend == "triton":
        return getattr(importlib.import_module(f"spikeops.triton.{op}"), fn)
    raise ValueError(f"no raw kernel for backend {backend!r}")
