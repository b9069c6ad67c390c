"""gpucloud: a GPU cloud control plane for Kubernetes."""
