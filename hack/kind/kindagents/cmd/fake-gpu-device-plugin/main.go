// fake-gpu-device-plugin: a device plugin for nodes without GPUs. It registers nvidia.com/gpu with the
// node's real kubelet, hands out stable GPU UUIDs through Allocate (as NVIDIA's plugin
// does, in NVIDIA_VISIBLE_DEVICES), labels the node the way GPU Feature Discovery does,
// and writes the node's device list to a file that the agent's fake NVML reads: one
// source of truth per node, so the agent attributes GPUs through the kubelet's real
// pod-resources API.
//
// The node's fake GPUs come from its labels (set in the kind cluster config):
//
//	gpucloud.dev/fake-gpu.product  e.g. NVIDIA-H100-80GB-HBM3
//	gpucloud.dev/fake-gpu.count    e.g. 8
//	gpucloud.dev/fake-gpu.memory   MiB per GPU, e.g. 81559
//
// and, to split them (docs/fractional-gpus.md), one of
//
//	gpucloud.dev/fake-gpu.mig       e.g. 7x1g.10gb: MIG devices as nvidia.com/mig-1g.10gb
//	                                (mixed strategy), on as many GPUs as they fill
//	gpucloud.dev/fake-gpu.replicas  e.g. 4: each GPU time-sliced 4 ways, nvidia.com/gpu.shared
package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"gpucloud.dev/kindagents/internal/kubeapi"
)

const (
	resourceName = "nvidia.com/gpu"
	socketName   = "gpucloud-fake-gpu.sock"
	labelPrefix  = "gpucloud.dev/fake-gpu."
)

func main() {
	log.SetFlags(log.LstdFlags | log.LUTC)
	node, err := kubeapi.NodeName()
	if err != nil {
		log.Fatal(err)
	}
	devicesFile := kubeapi.EnvOr("FAKE_GPU_DEVICES_FILE", "/run/gpucloud-fake-gpu/devices.json")
	pluginDir := kubeapi.EnvOr("DEVICE_PLUGIN_DIR", pluginapi.DevicePluginPath)

	api, err := kubeapi.InCluster()
	if err != nil {
		log.Fatalf("kubernetes API: %v", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	n, err := api.GetNode(ctx, node)
	if err != nil {
		log.Fatalf("read node %s: %v", node, err)
	}
	spec, err := specFromLabels(node, n.Metadata.Labels)
	if err != nil {
		log.Fatalf("node %s: %v", node, err)
	}
	if err := writeDevicesFile(devicesFile, spec); err != nil {
		log.Fatalf("write %s: %v", devicesFile, err)
	}
	if err := api.LabelNode(ctx, node, spec.gfdLabels()); err != nil {
		log.Fatalf("label node %s: %v", node, err)
	}
	log.Printf("node %s: %d x %s (%d MiB), %d %s devices in %s", node, spec.count, spec.product, spec.memoryMiB, len(spec.deviceIDs), spec.resource(), devicesFile)

	// Serve until the kubelet restarts (it removes plugin sockets when it does) or we
	// are told to stop; then register again on a fresh socket.
	for ctx.Err() == nil {
		if err := serveOnce(ctx, pluginDir, spec); err != nil {
			log.Printf("device plugin: %v; registering again in 2 s", err)
			select {
			case <-ctx.Done():
			case <-time.After(2 * time.Second):
			}
		}
	}
}

// serveOnce serves the plugin on a new socket, registers it and returns when the
// socket disappears (kubelet restart) or ctx ends.
func serveOnce(ctx context.Context, dir string, spec nodeSpec) error {
	sock := filepath.Join(dir, socketName)
	_ = os.Remove(sock)
	lis, err := net.Listen("unix", sock)
	if err != nil {
		return fmt.Errorf("listen %s: %w", sock, err)
	}
	srv := grpc.NewServer()
	pluginapi.RegisterDevicePluginServer(srv, &plugin{spec: spec})
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	defer srv.Stop()

	if err := register(ctx, filepath.Join(dir, filepath.Base(pluginapi.KubeletSocket)), spec.resource()); err != nil {
		return err
	}
	log.Printf("registered %d %s devices with the kubelet", len(spec.deviceIDs), spec.resource())
	tick := time.NewTicker(2 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-served:
			return fmt.Errorf("grpc server stopped: %w", err)
		case <-tick.C:
			if _, err := os.Stat(sock); err != nil {
				return errors.New("plugin socket removed (kubelet restarted)")
			}
		}
	}
}

func register(ctx context.Context, kubeletSocket, resource string) error {
	conn, err := grpc.NewClient("unix://"+kubeletSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("dial kubelet: %w", err)
	}
	defer conn.Close()
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err = pluginapi.NewRegistrationClient(conn).Register(rctx, &pluginapi.RegisterRequest{
		Version:      pluginapi.Version,
		Endpoint:     socketName,
		ResourceName: resource,
	})
	if err != nil {
		return fmt.Errorf("register with kubelet: %w", err)
	}
	return nil
}

type plugin struct {
	pluginapi.UnimplementedDevicePluginServer
	spec nodeSpec
}

func (p *plugin) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{}, nil
}

func (p *plugin) ListAndWatch(_ *pluginapi.Empty, s pluginapi.DevicePlugin_ListAndWatchServer) error {
	devs := make([]*pluginapi.Device, 0, len(p.spec.deviceIDs))
	for _, id := range p.spec.deviceIDs {
		devs = append(devs, &pluginapi.Device{ID: id, Health: pluginapi.Healthy})
	}
	if err := s.Send(&pluginapi.ListAndWatchResponse{Devices: devs}); err != nil {
		return err
	}
	<-s.Context().Done()
	return nil
}

// Allocate answers as NVIDIA's plugin does with its default (envvar) strategy: the
// container learns its GPUs' UUIDs from NVIDIA_VISIBLE_DEVICES.
func (p *plugin) Allocate(_ context.Context, r *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	known := make(map[string]bool, len(p.spec.deviceIDs))
	for _, id := range p.spec.deviceIDs {
		known[id] = true
	}
	resp := &pluginapi.AllocateResponse{}
	for _, c := range r.ContainerRequests {
		for _, id := range c.DevicesIds {
			if !known[id] {
				return nil, fmt.Errorf("unknown device %q", id)
			}
		}
		resp.ContainerResponses = append(resp.ContainerResponses, &pluginapi.ContainerAllocateResponse{
			Envs: map[string]string{"NVIDIA_VISIBLE_DEVICES": strings.Join(c.DevicesIds, ",")},
		})
	}
	return resp, nil
}

func atoiLabel(labels map[string]string, key string) (int, error) {
	v, ok := labels[key]
	if !ok {
		return 0, fmt.Errorf("label %s is missing", key)
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("label %s=%q: must be a positive integer", key, v)
	}
	return n, nil
}
