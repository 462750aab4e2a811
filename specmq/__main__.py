"""``python -m specmq``: the same entry point as the ``specmq`` console script."""
import sys

from specmq.cli import main

sys.exit(main())
