"""Triton GPU kernels. Each module mirrors a C++ file in csrc/cpu/ and exposes functions with the
same names and arguments as the C++ ones (see :func:`spikeops.backend.kernel`).

Spikes must equal the reference bit for bit, and two things the interpreter (``TRITON_INTERPRET=1``,
the CPU tests) does not show differ on a GPU: Triton contracts ``a * b + c`` into one FMA (one
rounding where the reference rounds twice) unless the launch passes ``enable_fp_fusion=False``,
as the SSA forward does for ``y * scale - V``; and fp32 ``/`` compiles to an approximate division,
so the neurons divide with ``tl.math.div_rn``. Neither matters where the result is a gradient
compared with a tolerance."""
