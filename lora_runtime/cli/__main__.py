"""``python -m lora_runtime.cli``: the same as the ``lora-runtime`` command."""

import sys

from lora_runtime.cli import main

sys.exit(main())
