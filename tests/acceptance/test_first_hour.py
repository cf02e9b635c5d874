"""What a new user meets in the first hour: one-line errors where a server cannot start."""

from __future__ import annotations

import socket

from tests import support


def test_an_api_on_a_port_in_use_is_one_line_and_exit_2(db_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = support.pgcast_env(db_url, PGCAST_JWT_SECRET="s" * 40, PGCAST_LOG_LEVEL="info")
        done = support.pgcast(db_url, "api", "--port", str(port), check=False, env=env)
    assert done.returncode == 2
    assert done.stderr == f"pgcast: error: cannot listen on 127.0.0.1:{port}: " \
                          "Address already in use\n"
    assert "startup complete" not in done.stdout + done.stderr
