"""``python -m steelworks`` == the ``steelworks`` console script (used by Ray jobs)."""

import sys

from steelworks.platform.cli import main

sys.exit(main())
