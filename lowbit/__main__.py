"""``python -m lowbit``: the command line (what ``torchrun -m lowbit compile ...`` starts in each process)."""

import sys

from lowbit.cli import main

sys.exit(main())
