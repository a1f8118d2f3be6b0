"""Drop-in ``torch.nn`` modules built on spikeops ops."""
from spikeops.nn.attention import SpikeLinearBNLIF, SpikingMLP, SpikingSelfAttention
from spikeops.nn.lif import LIF
from spikeops.nn.token_attention import ConvBNLIF, MultiScaleSpikingAttention, QKTokenAttention
from spikeops.nn.spike_layers import SpikeConv1d, SpikeConv2d, SpikeLinear, SpikeMaxPool2d

__all__ = ["LIF", "QKTokenAttention", "MultiScaleSpikingAttention", "ConvBNLIF", "SpikingSelfAttention", "SpikingMLP", "SpikeLinearBNLIF", "SpikeLinear", "SpikeConv1d", "SpikeConv2d", "SpikeMaxPool2d"]
from spikeops.nn.masked import MaskedBatchNorm2d, MaskedConv2d, from_masked, masking, to_masked

__all__ += ["MaskedConv2d", "MaskedBatchNorm2d", "masking", "to_masked", "from_masked"]
