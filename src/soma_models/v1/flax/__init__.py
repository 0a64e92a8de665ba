"""Flax (NNX) implementation of V1, numerically the same as the PyTorch one (SPEC §3)."""
