"""The edge: the public API and the data plane every request passes through."""
