"""Triton GPU kernels. Each module mirrors a C++ file in csrc/cpu/ and exposes functions with the
same names and arguments as the C++ ones (see :func:`spikeops.backend.kernel`)."""
