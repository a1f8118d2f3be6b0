"""spikeops: fused kernels for spiking vision transformers.

Quick start::

    import torch, spikeops
    x = torch.randn(4, 32, 384, 14, 14, requires_grad=True)   # [T, B, C, H, W]
    s = spikeops.lif(x)                                         # spikes, same shape
    s.sum().backward()
    neuron = spikeops.nn.LIF(tau=2.0, detach_reset=True)        # drop-in for LIFNode(step_mode="m")
"""
from spikeops import backend, nn, reference
from spikeops import memory
from spikeops.convert import convert
from spikeops.ops import PackedSpikes, lif, pack_if_binary, pack_spikes, spike_matmul, ssa, token_attention, unpack_spikes

__version__ = "0.1.0"
__all__ = ["lif", "token_attention", "spike_matmul", "ssa", "pack_spikes", "unpack_spikes", "PackedSpikes", "pack_if_binary", "nn", "convert", "backend", "reference", "memory", "__version__"]
from spikeops.ops import masked_batch_norm2d, masked_conv2d
from spikeops.nn.masked import masking
from spikeops import energy

__all__ += ["masked_conv2d", "masked_batch_norm2d", "masking", "energy"]
