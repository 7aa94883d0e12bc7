"""Our vocabulary, independent of Kubernetes and of Envoy: `from controlplane.ir import types as ir`."""
