"""Fused Triton kernels of fastunlearn, installed as ``fastunlearn.kernels`` (they import triton)."""
