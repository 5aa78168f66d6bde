"""Quantization numbers: the AIMET/QAIRT encodings format, AIMET's rules, presets, calibration ranges, which
tensors each encodings mode updates, mixed precision and GPTQ. The graph rewriting is the compiler's
(``lora_runtime.compiler.passes.qdq``)."""
