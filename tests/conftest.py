"""Test set-up shared by every test file.

Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter: Triton reads
TRITON_INTERPRET when kernels are defined, so it is set here, before spikeops is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
