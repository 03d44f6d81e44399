"""``python -m dsconv_tvm`` is the same as the ``dsconv-tvm`` command."""

import sys

from .cli.main import main

sys.exit(main())
