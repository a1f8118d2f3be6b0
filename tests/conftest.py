"""Test set-up shared by every test file.

Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter: Triton reads
TRITON_INTERPRET when kernels are defined, so it is set here, before spikeops is imported. On a GPU,
TF32 is switched off so that fp32 results of different kernels can be held to fp32 tolerances. MKL's
dynamic thread count is switched off (below).
"""
import os

# With MKL_DYNAMIC on (MKL's default) MKL may run a matmul on fewer threads than torch asks for,
# picking the count itself, and the split changes the rounding of the eager references that tests
# compare against. Seen once: an eager composition's input gradient took two values within one
# process of 40 repeats (the fused result one), one of them 1.5x a 1e-5 tolerance away; with
# MKL_DYNAMIC=FALSE, or one thread, 40 repeats gave one value. Tests pin MKL's thread count to torch's.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # fp32 comparisons between kernels mean fp32: no TF32 in cuDNN convolutions or cuBLAS matmuls
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
