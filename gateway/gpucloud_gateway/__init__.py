"""The gpucloud model gateway."""
