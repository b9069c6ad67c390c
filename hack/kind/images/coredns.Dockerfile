# CoreDNS: kubeadm's Deployment passes only arguments (-conf ...), so the image names
# the binary as its entrypoint, as upstream's does.
FROM scratch
COPY coredns /coredns
ENTRYPOINT ["/coredns"]
