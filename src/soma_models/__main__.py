"""`python -m soma_models` is the `soma-models` command."""

import sys

from soma_models.launch import main

sys.exit(main())
