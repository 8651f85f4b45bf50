"""``python -m edge_sdk.cli``: the same as the ``edge-sdk`` console script (the agent restarts itself this way)."""

import sys

from edge_sdk.cli import main

sys.exit(main())
