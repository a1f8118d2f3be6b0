"""Public ops: validation, backend dispatch and autograd around the raw kernels."""
from spikeops.ops.lif import lif

__all__ = ["lif"]
