"""Servicers for services whose methods a later issue builds.

Every method answers `UNIMPLEMENTED` with an `ErrorInfo` (reason NOT_IMPLEMENTED, the
issue that builds it) instead of the generated base class's bare status, so callers get
the same rich error shape as everywhere else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from types import ModuleType
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from switchyard.common.errors import unimplemented
from switchyard.common.server import ServiceBinding

T = TypeVar("T")


def unimplemented_servicer(base: type[T], service: ServiceDescriptor, issue: str) -> T:
    """An instance of `base` whose every method raises UNIMPLEMENTED naming `issue`."""
    methods: dict[str, Callable[..., Any]] = {}
    for method in service.methods:
        what = f"{service.name}.{method.name}"
        methods[method.name] = _stream(what, issue) if method.server_streaming else _unary(what, issue)
    cls = type(f"Unimplemented{service.name}", (base,), methods)
    instance: T = cls()
    return instance


def _unary(what: str, issue: str) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def method(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise unimplemented(what, issue)

    return method


def _stream(what: str, issue: str) -> Callable[[Any, Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def method(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        raise unimplemented(what, issue)
        yield  # an async generator, as gRPC expects of a server stream

    return method


def unimplemented_bindings(
    pb2: ModuleType, pb2_grpc: ModuleType, service: str, issue: str
) -> list[ServiceBinding]:
    """Bindings that serve `service` (from the generated modules) with every method UNIMPLEMENTED."""
    descriptor: ServiceDescriptor = pb2.DESCRIPTOR.services_by_name[service]
    servicer = unimplemented_servicer(getattr(pb2_grpc, f"{service}Servicer"), descriptor, issue)
    add = getattr(pb2_grpc, f"add_{service}Servicer_to_server")
    return [ServiceBinding(descriptor.full_name, lambda server: add(servicer, server))]
