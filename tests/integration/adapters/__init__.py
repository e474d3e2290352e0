"""Integration tests of the provider adapters against the vendor simulators."""
