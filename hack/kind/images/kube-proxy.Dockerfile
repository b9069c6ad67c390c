# kube-proxy in nftables mode runs `nft`; the Debian base carries it.
ARG BASE
FROM ${BASE}
COPY kube-proxy /usr/local/bin/kube-proxy
