"""``python -m hf_safe_exit.demo``."""

import sys

from .run import main

sys.exit(main())
