"""``python -m fusionbench``: the ``fusionbench`` command."""
import sys

from fusionbench.cli import main

sys.exit(main())
