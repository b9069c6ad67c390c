package main

import "testing"

// The same UUIDs as gpucloud_agent.fake_nvml.fake_gpu_uuid (tests/kind checks the pair).
func TestFakeGPUUUIDIsVersion5(t *testing.T) {
	got := fakeGPUUUID("node-a", 0)
	if len(got) != len("GPU-")+36 || got[:4] != "GPU-" || got[4+14] != '5' {
		t.Fatalf("not a GPU-prefixed v5 UUID: %s", got)
	}
	// uuid.uuid5(UUID("6f1d3a52-8d0e-4c55-9a3e-1b6c2f0a9d11"), "node-a/0") in Python
	if got != "GPU-74d34b24-f5bb-52be-a451-b36458e5e9a8" {
		t.Fatalf("differs from the agent's fake_gpu_uuid: %s", got)
	}
	if fakeGPUUUID("node-a", 1) == got || fakeGPUUUID("node-b", 0) == got {
		t.Fatal("UUIDs must differ per node and index")
	}
}

func TestSpecFromLabelsNamesTheBadLabel(t *testing.T) {
	_, err := specFromLabels("n", map[string]string{labelPrefix + "product": "X", labelPrefix + "count": "two", labelPrefix + "memory": "1"})
	if err == nil || err.Error() != `label gpucloud.dev/fake-gpu.count="two": must be a positive integer` {
		t.Fatalf("unexpected error: %v", err)
	}
}

// The same MIG UUIDs as gpucloud_agent.fake_nvml.fake_mig_uuid, packed floor(7/g) a GPU.
func TestMIGLayoutMatchesTheAgentsFakeNVML(t *testing.T) {
	s, err := specFromLabels("node-a", map[string]string{labelPrefix + "product": "X", labelPrefix + "count": "1", labelPrefix + "memory": "1", labelPrefix + "mig": "8x1g.10gb"})
	if err != nil {
		t.Fatal(err)
	}
	if s.resource() != "nvidia.com/mig-1g.10gb" || s.count != 2 || len(s.deviceIDs) != 8 {
		t.Fatalf("unexpected layout: %s, %d GPUs, %d devices", s.resource(), s.count, len(s.deviceIDs))
	}
	// uuid.uuid5(UUID("6f1d3a52-8d0e-4c55-9a3e-1b6c2f0a9d11"), "node-a/0/mig/3") in Python
	if s.deviceIDs[3] != "MIG-fd1f585b-c631-5b4d-ac5a-f333708c27f3" || s.deviceIDs[7] != fakeMIGUUID("node-a", 1, 0) {
		t.Fatalf("differs from the agent's fake_mig_uuid: %v", s.deviceIDs)
	}
	if s.gfdLabels()["nvidia.com/mig-1g.10gb.count"] != "8" {
		t.Fatalf("labels: %v", s.gfdLabels())
	}
}

func TestTimeSlicedReplicasAreSharedDevices(t *testing.T) {
	s, err := specFromLabels("node-a", map[string]string{labelPrefix + "product": "X", labelPrefix + "count": "2", labelPrefix + "memory": "1", labelPrefix + "replicas": "4"})
	if err != nil {
		t.Fatal(err)
	}
	if s.resource() != "nvidia.com/gpu.shared" || len(s.deviceIDs) != 8 || s.deviceIDs[5] != s.uuids[1]+"::1" {
		t.Fatalf("unexpected replicas: %s %v", s.resource(), s.deviceIDs)
	}
	if l := s.gfdLabels(); l["nvidia.com/gpu.product"] != "X-SHARED" || l["nvidia.com/gpu.replicas"] != "4" {
		t.Fatalf("labels: %v", l)
	}
}
