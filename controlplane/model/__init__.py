"""pydantic models of our CRDs and of the Kubernetes objects we read; the CRD schemas come from here."""
