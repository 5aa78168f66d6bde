"""Quantization: the AIMET/QAIRT encodings format (``encodings.py``) and, later, calibration and QDQ rewriting."""
