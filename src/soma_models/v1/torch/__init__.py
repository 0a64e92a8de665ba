"""PyTorch implementation of V1."""
