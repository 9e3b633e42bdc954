"""``python -m moedge.doctor ITEM WORK OUT``: one item of ``moedge doctor`` (the command starts these)."""

import sys

from moedge.doctor.child import main

sys.exit(main(sys.argv[1:]))
