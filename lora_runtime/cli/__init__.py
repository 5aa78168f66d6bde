"""``lora-runtime``: compile, run, inspect, bench, demo, and the LLM commands.

Every bad input ends in one line on stderr and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Sequence

from lora_runtime.cli.parser import parser
from lora_runtime.errors import LoraRuntimeError


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so every ``finally`` runs (staging folders are removed) as for
    Ctrl-C."""


def _terminate(_signum, _frame) -> None:  # noqa: ANN001
    raise Terminated


def _ort_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's exception classes (they derive from Exception directly)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(c for c in vars(state).values() if isinstance(c, type) and issubclass(c, Exception)
                 and c.__module__.startswith("onnxruntime"))


def _one_line(e: BaseException) -> str:
    """What went wrong, in one line: ours as written; the system's with the path it concerns (and, for a full
    disk, how much room is left); ONNX Runtime's without its preamble."""
    if isinstance(e, LoraRuntimeError):
        return " ".join(str(e).split())
    if isinstance(e, OSError):
        where = e.filename or ""
        text = f"{where}: {e.strerror or e}" if where else str(e.strerror or e)
        if e.errno == errno.ENOSPC:
            try:
                folder = os.path.dirname(os.path.abspath(where)) if where else "."
                while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
                    folder = os.path.dirname(folder)
                free = shutil.disk_usage(folder).free
                text += f" ({free:,} bytes free there); nothing was published: free space and run it again"
            except OSError:
                pass
        return text
    if isinstance(e, MemoryError):
        return "out of memory"
    from lora_runtime.runtime.session import ort_message

    return f"ONNX Runtime: {ort_message(e)}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    warnings.showwarning = lambda message, category, *_a, **_k: print(  # one line each, no source line
        f"lora-runtime {args.command}: warning: {message}", file=sys.stderr)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return int(args.func(args) or 0)
    except (LoraRuntimeError, OSError, MemoryError, *_ort_errors()) as e:
        if args.debug:
            traceback.print_exc()
        print(f"lora-runtime {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lora-runtime {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"lora-runtime {args.command}: terminated", file=sys.stderr)
        return 143
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)

