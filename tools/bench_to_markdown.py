"""Turn a `lora-runtime bench --json` report into the markdown tables of the README.

    python tools/bench_to_markdown.py b.json > table.md
"""

from __future__ import annotations

import json
import sys


def to_markdown(report: dict) -> str:
    out = ["| row | p50 us | p99 us | runs | bytes |", "|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        p50 = f"{r['p50_us']:,.1f}" if r["p50_us"] is not None else "-"
        p99 = f"{r['p99_us']:,.1f}" if r["p99_us"] is not None else "-"
        nbytes = f"{r['bytes']:,}" if r["bytes"] else ""
        out.append(f"| {r['name']} | {p50} | {p99} | {r['runs']} | {nbytes} |")
    out += ["", "| ratio (p50, same run) | value | goal | met |", "|---|---:|---|---|"]
    for name, v in report["ratios"].items():
        met = "" if v["met"] is None else ("yes" if v["met"] else "**no**")
        out.append(f"| {name} | {v['value']:.4g} | {v['goal'] or ''} | {met} |")
    for what, values in report.get("accuracy", {}).items():
        out += ["", f"Accuracy, {what}: " + ", ".join(f"{k} {v:.1f}" for k, v in values.items()) + "."]
    for what, values in report.get("accuracy_text", {}).items():  # bench --model smollm2: preformatted
        out += ["", f"Accuracy, {what}: " + ", ".join(f"{k} {v}" for k, v in values.items()) + "."]
    return "\n".join(out)


if __name__ == "__main__":
    print(to_markdown(json.load(open(sys.argv[1]))))
