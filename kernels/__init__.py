"""Triton kernels of moefuse, installed as the subpackage `moefuse.kernels`."""
