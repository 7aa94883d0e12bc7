"""A Python control plane for Envoy: Kubernetes in, xDS out."""
