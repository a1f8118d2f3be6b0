"""Triton GPU kernels. Each module mirrors a C++ file in csrc/cpu/ and exposes the same
``forward``/``backward`` functions (see :func:`spikeops.backend.kernel`)."""
