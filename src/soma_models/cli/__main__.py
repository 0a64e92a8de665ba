"""`python -m soma_models.cli` is the `soma-models` command (as `python -m soma_models`)."""

import sys

from soma_models.launch import main

sys.exit(main())
