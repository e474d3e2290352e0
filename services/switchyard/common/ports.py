"""Free loopback ports, for `switchyard run --free-ports`, simulators and tests."""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Final

# Ports below the OS's ephemeral range: one chosen here is never taken, between the choice
# and the caller's bind, by a `:0` bind or an outgoing connection's source port (the OS
# hands those out from the ephemeral range only). Below 10000 live the well-known services.
_LOWEST: Final = 10_000
_TRIES: Final = 200
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, for the caller to bind soon.

    Chosen below the ephemeral range when there is room (see `_LOWEST`), and never the same
    one twice in a process; else the OS picks one."""
    high = _ephemeral_low()
    for _ in range(_TRIES if high - _LOWEST > 1_000 else 0):
        port = random.randrange(_LOWEST, high)
        if port in _handed_out or not _bindable(host, port):
            continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
