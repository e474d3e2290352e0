"""A cache servicer served in process over real gRPC on a free loopback port."""

from __future__ import annotations

import grpc

from switchyard.common.server import SERVER_OPTIONS, ErrorInterceptor
from switchyard.v1 import cache_pb2_grpc


async def serve_cache(
    servicer: cache_pb2_grpc.CacheServiceServicer,
) -> tuple[grpc.aio.Server, grpc.aio.Channel]:
    """The started server and a channel to it (close the channel, then stop the server)."""
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=SERVER_OPTIONS)
    cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")
