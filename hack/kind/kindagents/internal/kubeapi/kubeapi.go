// Package kubeapi makes the few Kubernetes API calls the kind tier's node agents need,
// with the pod's ServiceAccount. client-go would triple each binary for three requests.
package kubeapi

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"
)

const saDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// NodeName is the pod's node, which a DaemonSet passes in NODE_NAME (downward API).
func NodeName() (string, error) {
	node := os.Getenv("NODE_NAME")
	if node == "" {
		return "", fmt.Errorf("NODE_NAME is not set (the DaemonSet passes spec.nodeName through the downward API)")
	}
	return node, nil
}

// EnvOr is the environment variable name, or fallback when it is empty.
func EnvOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

// Client talks to the API server of the cluster the pod runs in.
type Client struct {
	base   string
	token  string
	client *http.Client
}

// InCluster builds a client from the pod's environment and ServiceAccount files.
func InCluster() (*Client, error) {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return nil, fmt.Errorf("not in a pod: KUBERNETES_SERVICE_HOST/PORT are not set")
	}
	token, err := os.ReadFile(saDir + "/token")
	if err != nil {
		return nil, err
	}
	caPEM, err := os.ReadFile(saDir + "/ca.crt")
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("%s/ca.crt holds no certificate", saDir)
	}
	return &Client{
		base:  "https://" + net.JoinHostPort(host, port),
		token: string(bytes.TrimSpace(token)),
		client: &http.Client{Timeout: 15 * time.Second, Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
		}},
	}, nil
}

func (k *Client) do(ctx context.Context, method, path, contentType string, body []byte, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, k.base+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+k.token)
	req.Header.Set("Accept", "application/json")
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := k.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, bytes.TrimSpace(data))
	}
	if out != nil {
		return json.Unmarshal(data, out)
	}
	return nil
}

// Node is the part of a core/v1 Node the agents read.
type Node struct {
	Metadata struct {
		Name   string            `json:"name"`
		Labels map[string]string `json:"labels"`
	} `json:"metadata"`
	Spec struct {
		PodCIDR  string   `json:"podCIDR"`
		PodCIDRs []string `json:"podCIDRs"`
	} `json:"spec"`
	Status struct {
		Addresses []struct {
			Type    string `json:"type"`
			Address string `json:"address"`
		} `json:"addresses"`
	} `json:"status"`
}

// InternalIP is the node's first InternalIP address, or "".
func (n Node) InternalIP() string {
	for _, a := range n.Status.Addresses {
		if a.Type == "InternalIP" {
			return a.Address
		}
	}
	return ""
}

// GetNode reads one node.
func (k *Client) GetNode(ctx context.Context, name string) (Node, error) {
	var n Node
	err := k.do(ctx, http.MethodGet, "/api/v1/nodes/"+name, "", nil, &n)
	return n, err
}

// ListNodes reads every node.
func (k *Client) ListNodes(ctx context.Context) ([]Node, error) {
	var l struct {
		Items []Node `json:"items"`
	}
	err := k.do(ctx, http.MethodGet, "/api/v1/nodes", "", nil, &l)
	return l.Items, err
}

// LabelNode merge-patches labels onto a node.
func (k *Client) LabelNode(ctx context.Context, name string, labels map[string]string) error {
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"labels": labels}})
	if err != nil {
		return err
	}
	return k.do(ctx, http.MethodPatch, "/api/v1/nodes/"+name, "application/merge-patch+json", patch, nil)
}
