"""``python -m dsconv_tvm.cli`` is the same as the ``dsconv-tvm`` command."""

import sys

from .main import main

sys.exit(main())
