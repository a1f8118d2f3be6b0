"""Public ops: validation, backend dispatch and autograd around the raw kernels."""
from spikeops.ops.lif import lif
from spikeops.ops.pack import PackedSpikes, pack_if_binary, pack_spikes, unpack_spikes

__all__ = ["lif", "pack_spikes", "unpack_spikes", "PackedSpikes", "pack_if_binary"]
