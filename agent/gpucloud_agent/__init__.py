"""The gpucloud node agent."""
