# One static Go binary on an empty image: kube-apiserver, kube-controller-manager,
# kube-scheduler, etcd, local-path-provisioner.
FROM scratch
ARG BIN
COPY ${BIN} /usr/local/bin/
ENV PATH=/usr/local/bin
