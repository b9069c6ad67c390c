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
