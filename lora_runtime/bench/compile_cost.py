"""What the INT8 compile costs: the README's SmolLM2 w8a16 GPTQ compile run as a child process, its wall time and
its own peak RSS. The child reports its ``VmHWM`` when it exits: the high-water mark of its own address space. Its
``ru_maxrss`` (``wait4``, ``getrusage``) would not do: Linux counts in it the high-water mark of the address space
it had before ``exec``, the bench's own (a vfork child shares it). Without ``/proc``, ``ru_maxrss`` it is.

Rows (of ``bench --model smollm2``):

==================================  ===========================================================================
compile_int8_w8a16_gptq             wall time of ``lora-runtime compile ... --encodings full --preset w8a16
                                    --sensitive-db 30 --weight-rounding gptq --no-ort-reference`` (v3, ``caps``
                                    and ``listify``, use-cases base and caps, calibration-data's 32 prompts)
compile_int8_w8a16_gptq_peak_rss    its peak resident set size (bytes)
==================================  ===========================================================================
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from lora_runtime.bench.timing import Row

WALL = "compile_int8_w8a16_gptq"
PEAK = "compile_int8_w8a16_gptq_peak_rss"
GOALS = {"wall_s": 120.0, "peak_gb": 1.5}  # issue 20


# the child: the CLI, and at exit its own peak RSS written to argv[1]
CHILD = """import atexit, sys
from pathlib import Path
def peak(path=sys.argv.pop(1)):
    try:
        hwm = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return
    Path(path).write_text(str(int(hwm.split()[1]) * 1024))
atexit.register(peak)
from lora_runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""


def compile_argv(model_dir: Path, calibration: Path, out: Path) -> list[str]:
    """The README's INT8 compile of SmolLM2: the CLI's arguments."""
    return ["compile", "--base", str(model_dir / "base.onnx"),
            "--generation", "v3", "-o", str(out), "--force", "--adapter", "@smollm2/caps",
            "--adapter", "@smollm2/listify", "--use-case", "base=", "--use-case", "caps=caps", "--encodings", "full",
            "--calibration", str(calibration), "--preset", "w8a16", "--sensitive-db", "30", "--weight-rounding",
            "gptq", "--no-ort-reference"]


def compile_cost_rows(model_dir: Path, calibration: Path, out: Path) -> list[Row]:
    """The two rows; the child's output goes to ``out`` + ``.log``. Without ``/proc`` nor ``os.wait4``, no RSS
    row."""
    log, peak = out.with_name(out.name + ".log"), out.with_name(out.name + ".peak")
    peak.unlink(missing_ok=True)
    with open(log, "wb") as f:
        t = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(peak), *compile_argv(model_dir, calibration, out)],
                                 stdout=f, stderr=subprocess.STDOUT)
        if hasattr(os, "wait4"):
            _, status, usage = os.wait4(child.pid, 0)
            child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        else:
            child.wait()
            usage = None
        wall = time.perf_counter() - t
    if child.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the compile-cost compile exited {child.returncode}: {tail}")
    rows = [Row(WALL, wall * 1e6, None, 1, None)]
    if peak.is_file():
        rows.append(Row(PEAK, None, None, 1, int(peak.read_text())))
    elif usage is not None:  # ru_maxrss: kilobytes on Linux, bytes on macOS
        rows.append(Row(PEAK, None, None, 1, usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)))
    return rows


def compile_cost_ratios(by: dict[str, Row]) -> dict[str, dict]:
    """The rows against issue 20's goals: <= 120 s and <= 1.5 GB."""
    out = {}
    if WALL in by:
        s = by[WALL].p50_us / 1e6
        out[f"{WALL} (s)"] = {"value": s, "goal": f"<= {GOALS['wall_s']:g}", "met": s <= GOALS["wall_s"]}
    if PEAK in by:
        gb = by[PEAK].bytes / 1e9
        out[f"{PEAK} (GB)"] = {"value": gb, "goal": f"<= {GOALS['peak_gb']:g}", "met": gb <= GOALS["peak_gb"]}
    return out
