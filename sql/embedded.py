"""The embedded Postgres (the pgserver wheel's binaries), data in $PGCAST_HOME/pgdata."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from pgcast.sql import errors

logging.getLogger("pgserver").setLevel(logging.WARNING)  # it logs every start at INFO


LEGACY_HOME = ".pgcast"  # the default before 0.2, relative to the current directory
NOTICED = "legacy-home-noticed"  # a file in a kept ./.pgcast: the notice was given


def home() -> Path:
    """Where pgcast keeps its local state, one place per user.

    $PGCAST_HOME; else an existing ./.pgcast (pgcast's old default, and `make demo`'s),
    said once; else the XDG data directory, $XDG_DATA_HOME/pgcast or ~/.local/share/pgcast.
    """
    chosen = os.environ.get("PGCAST_HOME")
    if chosen:
        return Path(chosen).expanduser().resolve()
    legacy = Path(LEGACY_HOME).resolve()
    if (legacy / "pgdata").is_dir():
        marker = legacy / NOTICED
        if not marker.exists():
            print(f"pgcast: using the existing {legacy} (found in this directory); set "
                  f"PGCAST_HOME to choose, or move it to {xdg_home()}", file=sys.stderr)
            with contextlib.suppress(OSError):
                marker.touch()
        return legacy
    return xdg_home()


def xdg_home() -> Path:
    """$XDG_DATA_HOME/pgcast, else ~/.local/share/pgcast (a relative XDG_DATA_HOME is ignored,
    as the XDG specification says)."""
    base = os.environ.get("XDG_DATA_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "share"
    return root / "pgcast"


def pgdata(base: Path | None = None) -> Path:
    """The embedded server's data directory."""
    return (base or home()) / "pgdata"


def _quiet_import() -> object:
    # pgserver asks platformdirs for XDG_RUNTIME_DIR at import; machines without it warn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                import pgserver
            except ImportError:  # `make install` and a plain `pip install pgcast` leave it out
                raise errors.EmbeddedServerError(
                    "DATABASE_URL is not set and the embedded Postgres is not installed: set "
                    "DATABASE_URL, or install pgcast[embedded] (`make demo` and `make dev` "
                    "do)") from None
    return pgserver


def start(base: Path | None = None) -> str:
    """Start the embedded server unless it already runs (any process may); return its URL."""
    data = pgdata(base)
    data.parent.mkdir(parents=True, exist_ok=True)
    pgserver = _quiet_import()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = pgserver.get_server(data, cleanup_mode=None)  # type: ignore[attr-defined]
    except Exception as exc:  # pgserver raises bare subprocess/assert errors
        log = data / "log"
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise errors.EmbeddedServerError(
            f"cannot start embedded Postgres in {data}: {exc}\n{tail}") from exc
    return str(server.get_uri())


def _pg_ctl(args: list[str], data: Path) -> subprocess.CompletedProcess[str]:
    _quiet_import()
    from pgserver import _commands

    binary = Path(_commands.POSTGRES_BIN_PATH) / "pg_ctl"
    user = "pgserver" if os.geteuid() == 0 else None  # pgserver runs Postgres unprivileged
    return subprocess.run(
        [str(binary), "-D", str(data), *args], user=user, capture_output=True, text=True,
        check=False, timeout=60,
    )


def running(base: Path | None = None) -> bool:
    """Whether the embedded server of this home is up."""
    data = pgdata(base)
    return data.exists() and _pg_ctl(["status"], data).returncode == 0


def stop(base: Path | None = None, mode: str = "fast") -> bool:
    """Stop the embedded server; False when it was not running."""
    data = pgdata(base)
    if not running(base):
        return False
    done = _pg_ctl(["-w", "-m", mode, "stop"], data)
    if done.returncode != 0:
        raise errors.EmbeddedServerError(f"pg_ctl stop failed: {done.stderr.strip()}")
    return True


def discard(base: Path, mode: str = "immediate") -> None:
    """Stop a throwaway server (tests, benchmarks) and delete its directory: a 1M-row run
    leaves gigabytes, and every test session a data directory."""
    with contextlib.suppress(errors.EmbeddedServerError):
        stop(base, mode=mode)
    if not running(base):
        shutil.rmtree(base, ignore_errors=True)
