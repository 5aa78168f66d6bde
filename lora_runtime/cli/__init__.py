"""``lora-runtime``: compile, run, inspect, bench, demo, and the LLM commands.

Every bad input ends in one line on stderr and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence

from lora_runtime.cli.parser import parser
from lora_runtime.errors import LoraRuntimeError


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LoraRuntimeError as e:
        if args.debug:
            traceback.print_exc()
        print(f"lora-runtime {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lora-runtime {args.command}: interrupted", file=sys.stderr)
        return 130

