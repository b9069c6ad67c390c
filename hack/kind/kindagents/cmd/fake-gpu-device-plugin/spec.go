package main

import (
	"crypto/sha1"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
)

// The namespace of fake GPU UUIDs; the agent's fake NVML (gpucloud_agent.fake_nvml)
// derives the same UUIDs on the kwok tier, where no device plugin runs.
var uuidNamespace = [16]byte{0x6f, 0x1d, 0x3a, 0x52, 0x8d, 0x0e, 0x4c, 0x55, 0x9a, 0x3e, 0x1b, 0x6c, 0x2f, 0x0a, 0x9d, 0x11}

type nodeSpec struct {
	node      string
	product   string
	count     int
	memoryMiB int
	uuids     []string
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
	for i := 0; i < count; i++ {
		s.uuids = append(s.uuids, fakeGPUUUID(node, i))
	}
	return s, nil
}

// fakeGPUUUID is "GPU-" + the RFC 4122 name-based (SHA-1, version 5) UUID of "<node>/<index>".
func fakeGPUUUID(node string, index int) string {
	h := sha1.New()
	h.Write(uuidNamespace[:])
	h.Write([]byte(node + "/" + strconv.Itoa(index)))
	var u [16]byte
	copy(u[:], h.Sum(nil))
	u[6] = (u[6] & 0x0f) | 0x50
	u[8] = (u[8] & 0x3f) | 0x80
	return fmt.Sprintf("GPU-%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// gfdLabels are the labels GPU Feature Discovery puts on a node, the ones the operator
// places by and the kwok test bed uses.
func (s nodeSpec) gfdLabels() map[string]string {
	return map[string]string{
		"nvidia.com/gpu.present": "true",
		"nvidia.com/gpu.product": s.product,
		"nvidia.com/gpu.count":   strconv.Itoa(s.count),
		"nvidia.com/gpu.memory":  strconv.Itoa(s.memoryMiB),
	}
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
		Capacity: map[string]int{resourceName: s.count},
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
