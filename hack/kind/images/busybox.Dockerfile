# local-path-provisioner's helper pods run `sh -c "mkdir ..."`: Debian's busybox-static.
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
ENV PATH=/bin
