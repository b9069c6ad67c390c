"""GPU-to-pod attribution through the kubelet pod-resources API (gRPC over a unix socket)."""
