"""The response cache: exact and semantic, tenant-scoped, with streaming replay."""
