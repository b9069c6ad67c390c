package main

import (
	"crypto/sha1"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// The namespace of fake GPU UUIDs; the agent's fake NVML (gpucloud_agent.fake_nvml)
// derives the same UUIDs on the kwok tier, where no device plugin runs.
var uuidNamespace = [16]byte{0x6f, 0x1d, 0x3a, 0x52, 0x8d, 0x0e, 0x4c, 0x55, 0x9a, 0x3e, 0x1b, 0x6c, 0x2f, 0x0a, 0x9d, 0x11}

type nodeSpec struct {
	node      string
	product   string
	count     int // physical GPUs
	memoryMiB int
	uuids     []string // of the physical GPUs
	// At most one of these (docs/fractional-gpus.md): every GPU split into MIG devices
	// of one profile (the mixed strategy: resource nvidia.com/mig-<profile>), or every
	// GPU time-sliced into replicas (resource nvidia.com/gpu.shared).
	migProfile string
	migCount   int
	replicas   int
	deviceIDs  []string // what the kubelet is told: GPU UUIDs, MIG UUIDs or replicas
}

// resource is the extended resource the node's devices are advertised as.
func (s nodeSpec) resource() string {
	switch {
	case s.migProfile != "":
		return "nvidia.com/mig-" + s.migProfile
	case s.replicas > 0:
		return "nvidia.com/gpu.shared"
	}
	return resourceName
}

func specFromLabels(node string, labels map[string]string) (nodeSpec, error) {
	product := labels[labelPrefix+"product"]
	if product == "" {
		return nodeSpec{}, fmt.Errorf("label %sproduct is missing: this node has no fake GPUs", labelPrefix)
	}
	count, err := atoiLabel(labels, labelPrefix+"count")
	if err != nil {
		return nodeSpec{}, err
	}
	mem, err := atoiLabel(labels, labelPrefix+"memory")
	if err != nil {
		return nodeSpec{}, err
	}
	s := nodeSpec{node: node, product: product, count: count, memoryMiB: mem}
	mig, replicas := labels[labelPrefix+"mig"], labels[labelPrefix+"replicas"]
	if mig != "" && replicas != "" {
		return nodeSpec{}, fmt.Errorf("labels %smig and %sreplicas: a node is split one way only", labelPrefix, labelPrefix)
	}
	if replicas != "" {
		if s.replicas, err = atoiLabel(labels, labelPrefix+"replicas"); err != nil {
			return nodeSpec{}, err
		}
	}
	perGPU := 0
	if mig != "" {
		// "7x1g.10gb": count MIG devices of one profile, packed floor(7/g) to a GPU
		n, profile, ok := strings.Cut(mig, "x")
		g, _, gok := strings.Cut(profile, "g.")
		slices, gerr := strconv.Atoi(g)
		if s.migCount, err = strconv.Atoi(n); !ok || !gok || err != nil || gerr != nil || s.migCount <= 0 || slices < 1 || slices > migSlices {
			return nodeSpec{}, fmt.Errorf("label %smig=%q: must be COUNTxPROFILE, e.g. 7x1g.10gb", labelPrefix, mig)
		}
		s.migProfile, perGPU = profile, migSlices/slices
		s.count = (s.migCount + perGPU - 1) / perGPU
	}
	for i := 0; i < s.count; i++ {
		s.uuids = append(s.uuids, fakeGPUUUID(node, i))
	}
	switch {
	case s.migProfile != "":
		for i := 0; i < s.migCount; i++ {
			s.deviceIDs = append(s.deviceIDs, fakeMIGUUID(node, i/perGPU, i%perGPU))
		}
	case s.replicas > 0:
		for _, u := range s.uuids {
			for n := 0; n < s.replicas; n++ {
				s.deviceIDs = append(s.deviceIDs, u+"::"+strconv.Itoa(n))
			}
		}
	default:
		s.deviceIDs = s.uuids
	}
	return s, nil
}

// migSlices is the compute slices of an A100/H100 in MIG mode.
const migSlices = 7

// fakeGPUUUID is "GPU-" + the RFC 4122 name-based (SHA-1, version 5) UUID of "<node>/<index>".
func fakeGPUUUID(node string, index int) string {
	return "GPU-" + uuid5(node+"/"+strconv.Itoa(index))
}

// fakeMIGUUID is "MIG-" + the v5 UUID of "<node>/<gpu>/mig/<slot>" (fake_nvml.fake_mig_uuid).
func fakeMIGUUID(node string, gpu, slot int) string {
	return "MIG-" + uuid5(node+"/"+strconv.Itoa(gpu)+"/mig/"+strconv.Itoa(slot))
}

func uuid5(name string) string {
	h := sha1.New()
	h.Write(uuidNamespace[:])
	h.Write([]byte(name))
	var u [16]byte
	copy(u[:], h.Sum(nil))
	u[6] = (u[6] & 0x0f) | 0x50
	u[8] = (u[8] & 0x3f) | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// gfdLabels are the labels GPU Feature Discovery puts on a node, the ones the operator
// places by and the kwok test bed uses.
func (s nodeSpec) gfdLabels() map[string]string {
	l := map[string]string{
		"nvidia.com/gpu.present": "true",
		"nvidia.com/gpu.product": s.product,
		"nvidia.com/gpu.count":   strconv.Itoa(s.count),
		"nvidia.com/gpu.memory":  strconv.Itoa(s.memoryMiB),
	}
	if s.migProfile != "" {
		l["nvidia.com/mig.strategy"] = "mixed"
		l["nvidia.com/mig-"+s.migProfile+".count"] = strconv.Itoa(s.migCount)
	}
	if s.replicas > 0 {
		l["nvidia.com/gpu.product"] = s.product + "-SHARED"
		l["nvidia.com/gpu.replicas"] = strconv.Itoa(s.replicas)
	}
	return l
}

// devicesFile is what the agent's fake NVML reads (FakeNvml.from_config).
type devicesFile struct {
	Node     string            `json:"node"`
	Labels   map[string]string `json:"labels"`
	Capacity map[string]int    `json:"capacity"`
	UUIDs    []string          `json:"uuids"`
}

func writeDevicesFile(path string, s nodeSpec) error {
	body, err := json.MarshalIndent(devicesFile{
		Node:     s.node,
		Labels:   s.gfdLabels(),
		Capacity: map[string]int{s.resource(): len(s.deviceIDs)},
		UUIDs:    s.uuids,
	}, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(body, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path) // readers never see half a file
}
