"""Test child: a gRPC server that serves only grpc.health.v1.

usage: health_server.py PORT [START_DELAY_S]

Reports NOT_SERVING for START_DELAY_S seconds (default 0.2), then SERVING.
Exits 0 on SIGTERM after a graceful shutdown.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


async def main() -> None:
    port = int(sys.argv[1])
    delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.2
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    print(f"health server on 127.0.0.1:{port}, warming up", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await asyncio.sleep(delay)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print("serving", flush=True)
    await stop.wait()
    print("got SIGTERM, shutting down", flush=True)
    await server.stop(0.5)


if __name__ == "__main__":
    asyncio.run(main())
