"""Measuring bundles: outputs against a reference per use-case (SQNR, argmax and greedy-token agreement),
and ONNX Runtime's own quantization of the same use-case as a peer. Reads bundles; knows no compiler."""
