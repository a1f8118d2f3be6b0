"""Test set-up shared by every test file.

Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter: Triton reads
TRITON_INTERPRET when kernels are defined, so it is set here, before spikeops is imported. On a GPU,
TF32 is switched off so that fp32 results of different kernels can be held to fp32 tolerances.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # fp32 comparisons between kernels mean fp32: no TF32 in cuDNN convolutions or cuBLAS matmuls
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
