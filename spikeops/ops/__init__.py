"""Public ops: validation, backend dispatch and autograd around the raw kernels."""
from spikeops.ops.lif import lif
from spikeops.ops.spike_matmul import spike_matmul
from spikeops.ops.ssa import ssa
from spikeops.ops.token_attention import token_attention
from spikeops.ops.pack import PackedSpikes, pack_if_binary, pack_spikes, unpack_spikes

__all__ = ["lif", "token_attention", "spike_matmul", "ssa", "pack_spikes", "unpack_spikes", "PackedSpikes", "pack_if_binary"]
from spikeops.ops.masked_conv import masked_conv2d
from spikeops.ops.masked_batch_norm import masked_batch_norm2d

__all__ += ["masked_conv2d", "masked_batch_norm2d"]
