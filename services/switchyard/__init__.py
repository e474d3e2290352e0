"""Switchyard: a gRPC-native LLM gateway built as a mesh of small services."""

__version__ = "0.1.0"
