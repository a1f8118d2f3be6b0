"""``python -m spikeops.train ...``: see ``python -m spikeops.train --help``."""
import sys

from spikeops.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
