"""Provider adapters: the `ProviderAdapterService`, one deployment per vendor wire format.

`base` holds the vendor-neutral machinery (translator interface, SSE parser, pooled
streaming HTTP client with its timeouts), `vendors` one translator per vendor, and
`service` the gRPC servicer and `adapter_parts` for the server bootstrap.
"""
