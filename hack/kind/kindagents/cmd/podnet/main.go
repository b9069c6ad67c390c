// podnet: the kind tier's pod network, what kindnet does for kind (kindnet is not
// published as a Go module). On its node it writes the CNI config that gives pods
// addresses from the node's podCIDR (Debian's ptp, host-local and portmap plugins);
// towards every other node it keeps one route: that node's podCIDR via its InternalIP.
// All kind nodes share one Docker bridge, so those routes are the whole network.
//
// It lists the nodes every few seconds rather than watching them: a handful of nodes,
// and a list is its own resync after any error.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"

	"gpucloud.dev/kindagents/internal/kubeapi"
)

// routeProtocol marks the routes podnet owns, so it removes only its own stale ones.
const routeProtocol = netlink.RouteProtocol(99)

func main() {
	log.SetFlags(log.LstdFlags | log.LUTC)
	self, err := kubeapi.NodeName()
	if err != nil {
		log.Fatal(err)
	}
	confPath := kubeapi.EnvOr("CNI_CONFIG", "/etc/cni/net.d/10-gpucloud-podnet.conflist")
	period := 5 * time.Second
	api, err := kubeapi.InCluster()
	if err != nil {
		log.Fatalf("kubernetes API: %v", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	for {
		if err := sync(ctx, api, self, confPath); err != nil {
			log.Printf("sync: %v", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(period):
		}
	}
}

func sync(ctx context.Context, api *kubeapi.Client, self, confPath string) error {
	nodes, err := api.ListNodes(ctx)
	if err != nil {
		return err
	}
	want := map[string]netlink.Route{} // by destination
	for _, n := range nodes {
		cidr := n.Spec.PodCIDR
		if cidr == "" {
			continue // the controller-manager has not given it a range yet
		}
		_, dst, err := net.ParseCIDR(cidr)
		if err != nil {
			return fmt.Errorf("node %s: podCIDR %q: %w", n.Metadata.Name, cidr, err)
		}
		if n.Metadata.Name == self {
			if err := writeConfig(confPath, cidr); err != nil {
				return err
			}
			continue
		}
		gw := net.ParseIP(n.InternalIP())
		if gw == nil {
			continue
		}
		want[dst.String()] = netlink.Route{Dst: dst, Gw: gw, Protocol: routeProtocol}
	}
	for _, r := range want {
		if err := netlink.RouteReplace(&r); err != nil {
			return fmt.Errorf("route %s via %s: %w", r.Dst, r.Gw, err)
		}
	}
	have, err := netlink.RouteListFiltered(netlink.FAMILY_V4,
		&netlink.Route{Protocol: routeProtocol}, netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return err
	}
	for _, r := range have {
		if _, ok := want[r.Dst.String()]; !ok {
			log.Printf("removing route %s via %s (node gone)", r.Dst, r.Gw)
			if err := netlink.RouteDel(&r); err != nil {
				return err
			}
		}
	}
	return nil
}

// writeConfig writes the node's CNI config when it differs; the kubelet reports the
// node Ready once a config exists.
func writeConfig(path, podCIDR string) error {
	conf := map[string]any{
		"cniVersion": "0.4.0",
		"name":       "gpucloud-podnet",
		"plugins": []any{
			map[string]any{
				"type":   "ptp",
				"ipMasq": false, // nothing outside the cluster is reachable anyway
				"mtu":    1500,
				"ipam": map[string]any{
					"type":    "host-local",
					"dataDir": "/run/cni-ipam-state",
					"routes":  []any{map[string]string{"dst": "0.0.0.0/0"}},
					"ranges":  []any{[]any{map[string]string{"subnet": podCIDR}}},
				},
			},
			map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}},
		},
	}
	body, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return err
	}
	body = append(body, '\n')
	if old, err := os.ReadFile(path); err == nil && string(old) == string(body) {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, body, 0o644); err != nil {
		return err
	}
	log.Printf("pods on this node get addresses from %s (%s)", podCIDR, path)
	return os.Rename(tmp, path)
}
