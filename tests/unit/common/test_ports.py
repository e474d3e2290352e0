"""Free ports are bindable, distinct, and outside the range the OS hands out by itself."""

from __future__ import annotations

import socket

from switchyard.common.ports import _ephemeral_low, free_port


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(10_000 <= port < _ephemeral_low() for port in ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", ports[0]))
        sock.listen()
        # What the OS picks for a `:0` bind never collides with a port chosen here.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
            other.bind(("127.0.0.1", 0))
            assert other.getsockname()[1] >= _ephemeral_low()
