"""Run a command against a throwaway Debian PostgreSQL server: `python -m tests.realpg
--version 15 -- pytest tests/integration` installs postgresql-15 when missing, starts it on a
free loopback port in a temporary directory (as an unprivileged user when run as root:
Postgres refuses root), runs the command with DATABASE_URL pointing at it, stops it and
removes the directory, and exits with the command's status."""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests import support

SETTINGS = {  # a test server: nothing here must be durable across an OS crash
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "300",  # acceptance tests run several workers, each with a pool
    "shared_buffers": "128MB",
}


def run_as() -> str | None:
    """The user servers run as: `postgres` (Debian's) when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise SystemExit("running as root and neither `postgres` nor `nobody` exists")


def give(path: Path, user: str | None) -> None:
    """Hand a directory we created to the user the server runs as."""
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def apt_install(package: str) -> None:
    """apt-get install a Debian package, refreshing the lists once if it is not known."""
    if os.geteuid() != 0:
        raise SystemExit(f"{package} is missing; install it (apt-get install -y {package})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", package]
    if subprocess.run(cmd, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(cmd, env=env, check=True)


def bindir(version: int, install: bool) -> Path:
    """Debian's binaries of this major version, installed first when allowed."""
    path = Path(f"/usr/lib/postgresql/{version}/bin")
    if not (path / "postgres").exists() and install:
        apt_install(f"postgresql-{version}")
    if not (path / "postgres").exists():
        raise SystemExit(f"PostgreSQL {version} is not installed in {path}")
    return path


@contextlib.contextmanager
def server(version: int, *, install: bool = True) -> Iterator[str]:
    """A fresh PostgreSQL `version` server on a free port; yields its superuser URL."""
    binaries = bindir(version, install)
    user = run_as()
    base = Path(tempfile.mkdtemp(prefix=f"pgcast-pg{version}-"))
    os.chmod(base, 0o755)
    give(base, user)
    data = base / "data"
    port = support.free_port()

    def run(*args: str) -> None:
        subprocess.run([str(binaries / args[0]), *args[1:]], user=user, check=True,
                       stdout=subprocess.DEVNULL, timeout=120)

    try:
        run("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync")
        options = " ".join(f"-c {k}={v}" for k, v in SETTINGS.items())
        run("pg_ctl", "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60",
            "-o", f"-p {port} -k {base} {options}", "start")
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Start the server, run the command against it, stop it; the command's exit status."""
    parser = argparse.ArgumentParser(prog="python -m tests.realpg", description=__doc__)
    parser.add_argument("--version", type=int, default=15, help="PostgreSQL major version")
    parser.add_argument("--no-install", action="store_true", help="never run apt-get")
    parser.add_argument("--pgbouncer", action="store_true",
                        help="install Debian's pgbouncer too when it is missing")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("a command to run is required")
    if args.pgbouncer and not Path(support.PgBouncer.BINARY).exists():
        if args.no_install:
            raise SystemExit(f"{support.PgBouncer.BINARY} is missing")
        apt_install("pgbouncer")
    with server(args.version, install=not args.no_install) as url:
        print(f"PostgreSQL {args.version} at {url}", file=sys.stderr, flush=True)
        return subprocess.run(command, env={**os.environ, "DATABASE_URL": url},
                              check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
