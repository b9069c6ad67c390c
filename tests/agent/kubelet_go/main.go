// A pod-resources server built on the kubelet's own API package and gRPC-Go, as the
// kubelet serves it: tests/agent/test_podresources_go.py checks the agent's
// hand-written gRPC/HTTP/2 client and protobuf decoder against it.
//
//	kubelet_go SOCKET PODS [fail]
//
// Every pod has one container holding two GPUs, with every field a kubelet fills in
// (CPU IDs, memory, topology, dynamic resources). "fail" answers UNAVAILABLE instead.
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	podresources "k8s.io/kubelet/pkg/apis/podresources/v1"
)

type lister struct {
	podresources.UnimplementedPodResourcesListerServer
	pods int
	fail bool
}

func (l *lister) List(context.Context, *podresources.ListPodResourcesRequest) (*podresources.ListPodResourcesResponse, error) {
	if l.fail {
		return nil, status.Error(codes.Unavailable, "kubelet says no: 100% busy")
	}
	out := &podresources.ListPodResourcesResponse{}
	numa := &podresources.TopologyInfo{Nodes: []*podresources.NUMANode{{ID: 1}}}
	for i := 0; i < l.pods; i++ {
		ids := []string{fmt.Sprintf("GPU-%08d-0000-0000-0000-000000000000", 2*i),
			fmt.Sprintf("GPU-%08d-0000-0000-0000-000000000000", 2*i+1)}
		out.PodResources = append(out.PodResources, &podresources.PodResources{
			Name:      fmt.Sprintf("pod-%d", i),
			Namespace: "team",
			Containers: []*podresources.ContainerResources{{
				Name:    "main",
				Devices: []*podresources.ContainerDevices{{ResourceName: "nvidia.com/gpu", DeviceIds: ids, Topology: numa}},
				CpuIds:  []int64{0, 1, 70, 300},
				Memory:  []*podresources.ContainerMemory{{MemoryType: "memory", Size: 1 << 33, Topology: numa}},
				DynamicResources: []*podresources.DynamicResource{{
					ClaimName: "claim", ClaimNamespace: "team",
					ClaimResources: []*podresources.ClaimResource{{CdiDevices: []*podresources.CDIDevice{{Name: "x"}}}},
				}},
			}},
		})
	}
	return out, nil
}

func main() {
	pods, err := strconv.Atoi(os.Args[2])
	if err != nil {
		panic(err)
	}
	os.Remove(os.Args[1])
	lis, err := net.Listen("unix", os.Args[1])
	if err != nil {
		panic(err)
	}
	server := grpc.NewServer()
	podresources.RegisterPodResourcesListerServer(server, &lister{pods: pods, fail: len(os.Args) > 3 && os.Args[3] == "fail"})
	fmt.Println("ready")
	if err := server.Serve(lis); err != nil {
		panic(err)
	}
}
