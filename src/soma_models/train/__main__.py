"""`python -m soma_models.train ...` and `torchrun ... -m soma_models.train ...`."""

import sys

from soma_models.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
