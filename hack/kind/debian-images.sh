#!/usr/bin/env bash
# Debian root filesystems for the kind tier's images, made with mmdebstrap from Debian's
# packages and imported into Docker (there is no registry to pull a base image from).
# Prints the tag of the one asked for, building it only when its package list changed.
#   usage: debian-images.sh python|netutils|node
set -euo pipefail
source "$(dirname "$0")/lib.sh"

case ${1:?python, netutils or node} in
  # the runtime of our Python images (operator, API, gateway, agent, fake model server)
  python) packages=(python3 ca-certificates) ;;
  # kube-proxy's image: its nftables mode runs nft; iptables/conntrack for cleanup
  netutils) packages=(nftables iptables conntrack) ;;
  # a kind node: systemd as init, containerd and runc, the CNI plugins our podnet
  # configures (ptp, host-local, portmap), and what kind's entrypoint and kubeadm call
  node) packages=(systemd systemd-sysv dbus containerd runc containernetworking-plugins
                  iptables nftables conntrack iproute2 ethtool util-linux mount kmod
                  libseccomp2 pigz bash ca-certificates jq procps socat ebtables) ;;
  *) die "unknown Debian image $1 (python, netutils or node)" ;;
esac
name=$1
tag="gpucloud.local/debian-$name:$DEBIAN_SUITE-$(inputs_hash "$DEBIAN_SUITE" "${packages[*]}" "$0")"
if image_exists "$tag"; then echo "$tag"; exit 0; fi
command -v mmdebstrap >/dev/null || die "mmdebstrap is missing: apt-get install mmdebstrap (make system-deps does)"

# The host's own apt sources (deb822 or one-line), so the build uses the mirror this
# machine is configured with.
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [[ -s $f ]] && sources+=("$f")
done
((${#sources[@]})) || die "no apt sources on this machine (/etc/apt/sources.list*)"

tar=$(mktemp --suffix=.tar)
trap 'rm -f "$tar"' EXIT
log "mmdebstrap $name: ${packages[*]}"
includes=$(IFS=,; echo "${packages[*]}")
# merged /usr by mmdebstrap's own hook, not the usrmerge package (which pulls in perl)
hooks=()
[[ -d /usr/share/mmdebstrap/hooks/merged-usr ]] && hooks=(--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr)
mmdebstrap --variant=minbase --include="$includes" "${hooks[@]}" \
  --aptopt='Acquire::Check-Valid-Until "false"' --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
  "$DEBIAN_SUITE" "$tar" "${sources[@]}" >&2
"$DOCKER" import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  "$tar" "$tag" >/dev/null
log "built $tag ($("$DOCKER" image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec))"
echo "$tag"
