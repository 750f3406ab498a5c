"""Quantization: formats, quantizers, recipes, calibration, and save/restore."""
