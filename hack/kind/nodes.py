"""Prints the fake GPU Node manifests of the test bed (same products, labels, capacity)
for a kind cluster whose kwok controller then plays their kubelets.

    python hack/kind/nodes.py | kubectl apply -f -
    GPUCLOUD_TESTBED_NODES=NVIDIA-L40S:2:4 python hack/kind/nodes.py
"""

from __future__ import annotations

import sys

import yaml

from gpucloud.testing.testbed import build_node, parse_node_mix


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: object) -> bool:
        return True  # capacity and allocatable share one dict; write both out plainly


def manifests(spec: str = "") -> str:
    nodes = [build_node(n) for n in parse_node_mix(spec)]
    return yaml.dump_all(nodes, Dumper=_NoAliases, sort_keys=False)


if __name__ == "__main__":
    sys.stdout.write(manifests(sys.argv[1] if len(sys.argv) > 1 else ""))
