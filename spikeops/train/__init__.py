"""``python -m spikeops.train`` / ``spikeops-train``: train spiking vision transformers.

Modules: :mod:`~spikeops.train.cli` (options, entry point), :mod:`~spikeops.train.recipes`
(presets), :mod:`~spikeops.train.data` (datasets, batch augmentation), :mod:`~spikeops.train.modeling`
(classifier / masked pre-trainer / fine-tuning), :mod:`~spikeops.train.loop` (epochs,
checkpoint/resume, logs), :mod:`~spikeops.train.distributed` (torchrun / DDP).
"""


class UsageError(ValueError):
    """A problem with the options or files given; the CLI prints it without a traceback."""
