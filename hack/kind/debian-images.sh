#!/usr/bin/env bash
# Debian root filesystems for the kind tier's images, made with mmdebstrap from Debian's
# packages and imported into Docker (there is no registry to pull a base image from).
# Prints the tag of the one asked for, building it only when its package list changed.
#   usage: debian-images.sh python|netutils|node|postgresql
set -euo pipefail
source "$(dirname "$0")/lib.sh"
# image_exists below reads "not there" when dockerd is down: start it first
ensure_docker

case ${1:?python, netutils, node or postgresql} in
  # the runtime of our Python images (operator, API, gateway, agent, fake model server)
  python) packages=(python3 ca-certificates) ;;
  # kube-proxy's image: its nftables mode runs nft; iptables/conntrack for cleanup
  netutils) packages=(nftables iptables conntrack) ;;
  # a kind node: systemd as init, containerd and runc, the CNI plugins our podnet
  # configures (ptp, host-local, portmap), and what kind's entrypoint and kubeadm call
  node) packages=(systemd systemd-sysv dbus containerd runc containernetworking-plugins
                  iptables nftables conntrack iproute2 ethtool util-linux mount kmod
                  libseccomp2 pigz bash ca-certificates jq procps socat ebtables) ;;
  # the test tier's PostgreSQL server (the chart's database.type=postgresql)
  postgresql) packages=(postgresql ca-certificates) ;;
  *) die "unknown Debian image $1 (python, netutils, node or postgresql)" ;;
esac
name=$1
# How every image is made (the tag covers this and the package list, not the rest of
# this script, so adding an image does not rebuild the others).
# merged /usr by mmdebstrap's own hook, not the usrmerge package (which pulls in perl)
opts=(--variant=minbase --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
  --aptopt='Acquire::Check-Valid-Until "false"' --aptopt='APT::Install-Recommends "false"'
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*')
tag="gpucloud.local/debian-$name:$DEBIAN_SUITE-$(inputs_hash "$DEBIAN_SUITE" "${packages[*]}" "${opts[*]}")"
if image_exists "$tag"; then echo "$tag"; exit 0; fi
command -v mmdebstrap >/dev/null || die "mmdebstrap is missing: apt-get install mmdebstrap (make system-deps does)"

# The host's own apt sources (deb822 or one-line), so the build uses the mirror this
# machine is configured with.
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [[ -s $f ]] && sources+=("$f")
done
((${#sources[@]})) || die "no apt sources on this machine (/etc/apt/sources.list*)"

t0=$SECONDS
tar=$(mktemp --suffix=.tar)
trap 'rm -f "$tar"' EXIT
log "mmdebstrap $name: ${packages[*]}"
includes=$(IFS=,; echo "${packages[*]}")
[[ -d /usr/share/mmdebstrap/hooks/merged-usr ]] || die "mmdebstrap without its merged-usr hook: Debian 12 or newer is needed"
mmdebstrap "${opts[@]}" --include="$includes" \
  "$DEBIAN_SUITE" "$tar" "${sources[@]}" >&2
"$DOCKER" import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  "$tar" "$tag" >/dev/null
echo $((SECONDS - t0)) >"$KIND_CACHE/build-seconds-debian-$name"
log "built $tag in $((SECONDS - t0)) s ($("$DOCKER" image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec))"
echo "$tag"
