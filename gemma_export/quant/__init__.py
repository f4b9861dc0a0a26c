"""Quantization in PyTorch: recipes as data, rounding algorithms, calibration, quantized modules."""
