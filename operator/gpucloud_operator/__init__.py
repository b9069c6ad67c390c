"""The gpucloud Kopf operator."""
