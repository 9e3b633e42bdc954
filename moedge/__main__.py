"""``python -m moedge``."""

import sys

from moedge.cli import main

sys.exit(main())
