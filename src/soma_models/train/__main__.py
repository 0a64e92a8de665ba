"""`python -m soma_models.train ...` and `torchrun ... -m soma_models.train ...`."""

import sys

from soma_models.launch import train_main

if __name__ == "__main__":
    sys.exit(train_main())
