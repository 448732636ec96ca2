"""Pallas kernels (TPU Mosaic; interpret mode elsewhere)."""
