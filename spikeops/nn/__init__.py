"""Drop-in ``torch.nn`` modules built on spikeops ops."""
from spikeops.nn.lif import LIF

__all__ = ["LIF"]
