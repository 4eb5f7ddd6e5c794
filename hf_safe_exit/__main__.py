"""``python -m hf_safe_exit ...`` (and ``accelerate launch -m hf_safe_exit collect ...``): the CLI."""

import sys

from .cli import main

sys.exit(main())
