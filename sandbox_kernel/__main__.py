"""``python -m sandbox_kernel``: the ``sandbox-kernel`` command (``cli.main``).

Layer: cli.
"""

import sys

from .cli import main

sys.exit(main())
