"""``python -m thinpool``: the same command line as the ``thinpool`` console script."""

import sys

from thinpool.cli import main

sys.exit(main())
