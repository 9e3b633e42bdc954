"""``python -m moedge.cli`` (the same as ``moedge`` and ``python -m moedge``)."""

import sys

from moedge.cli import main

sys.exit(main())
