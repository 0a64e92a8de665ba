"""`python -m soma_models` is the `soma-models` command."""

import sys

from soma_models.cli import main

sys.exit(main())
