"""`pgcast api`'s listening socket: its connections get TCP_NODELAY (issue 29's bench)."""

from __future__ import annotations

import socket

from pgcast.bin import api_commands


def test_the_listening_socket_is_tcp_so_asyncio_sets_nodelay_on_each_connection() -> None:
    # asyncio sets TCP_NODELAY on an accepted connection only when its proto is IPPROTO_TCP;
    # a socket made with proto 0 left Nagle on, and a JSON answer written as two sends (head,
    # body) waited ~40 ms for the client's delayed ACK: every database-backed route took
    # ~45 ms through `pgcast api` and ~1 ms through `uvicorn --factory`
    sock = api_commands._listen("127.0.0.1", 0)
    try:
        sock.listen()
        client = socket.create_connection(sock.getsockname())
        accepted, _ = sock.accept()
        with client, accepted:
            assert accepted.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
