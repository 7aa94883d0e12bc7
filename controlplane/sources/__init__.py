"""The only code that does Kubernetes or file I/O, and the store of the objects it found."""
